// Chat templates (runtime/chat_template.h): byte-for-byte equality with jinja2 (in
// transformers' environment) on the fixture templates x conversations of
// tests/fixtures/chat_templates, each Jinja feature on its own, the errors (line named,
// raise_exception's message, unknown filters, bounded nesting, steps and output), and the
// reading of a model folder's template.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "runtime/chat_template.h"

namespace hm {
namespace {

using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

const std::string kDir = std::string(HM_SOURCE_DIR) + "/tests/fixtures/chat_templates/";

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << path;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// make_expected.py's clock: 2026-01-15 09:30:05.
std::tm fixed_now() {
  std::tm tm{};
  tm.tm_year = 2026 - 1900;
  tm.tm_mon = 0;
  tm.tm_mday = 15;
  tm.tm_hour = 9;
  tm.tm_min = 30;
  tm.tm_sec = 5;
  tm.tm_wday = 4;  // a Thursday
  tm.tm_yday = 14;
  return tm;
}

std::string render(const std::string& src, const ojson& vars = ojson::object(), ChatTemplateLimits lim = {}) {
  ChatTemplate t(src, lim);
  t.set_clock(fixed_now);
  return t.render(vars);
}

// The hm::Error that parsing or rendering src throws ("" and a failure when none).
std::string error_of(const std::string& src, const ojson& vars = ojson::object(), ChatTemplateLimits lim = {}) {
  try {
    render(src, vars, lim);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error from: " << src;
  return "";
}

TEST(ChatTemplate, FixturesEqualJinja2ByteForByte) {
  const ojson cases = ojson::parse(slurp(kDir + "cases.json"));
  const ojson expected = ojson::parse(slurp(kDir + "expected.json"))["renders"];
  int outputs = 0, errors = 0;
  for (const auto& [name, results] : expected.items()) {
    ChatTemplate t(slurp(kDir + name + ".jinja"));
    t.set_clock(fixed_now);
    for (const auto& conv : cases["conversations"]) {
      ojson vars = cases["special_tokens"].value(name, ojson::object());
      vars["messages"] = conv["messages"];
      vars["tools"] = conv.value("tools", ojson());
      vars["documents"] = nullptr;
      vars["add_generation_prompt"] = conv["add_generation_prompt"];
      const std::string cname = conv["name"];
      ASSERT_TRUE(results.contains(cname)) << name << "/" << cname << ": rerun make_expected.py";
      const ojson& want = results[cname];
      if (want.contains("output")) {
        std::string got;
        EXPECT_NO_THROW(got = t.render(vars)) << name << "/" << cname;
        EXPECT_EQ(got, want["output"].get<std::string>()) << name << "/" << cname;
        ++outputs;
      } else {
        std::string msg;
        try {
          t.render(vars);
        } catch (const Error& e) {
          msg = e.what();
        }
        EXPECT_FALSE(msg.empty()) << name << "/" << cname << ": jinja2 fails with " << want["error"];
        if (want.value("raised", false)) {
          EXPECT_NE(msg.find(want["error"].get<std::string>()), std::string::npos)
              << name << "/" << cname << ": " << msg;
        }
        ++errors;
      }
    }
  }
  EXPECT_GE(expected.size(), 7u);
  EXPECT_GE(outputs, 40);
  EXPECT_GE(errors, 6);
}

TEST(ChatTemplate, Jinja2StillAgreesWithExpectedJson) {
  if (std::system("python3 -c 'import jinja2' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 with jinja2 is not installed (apt-get install python3-jinja2): expected.json is "
                    "not re-rendered, so drift from jinja2 goes unseen";
  const std::string cmd = "python3 " + kDir + "make_expected.py --check";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << ": the fixture templates render differently with jinja2 now";
}

TEST(ChatTemplate, PrintsLiteralsAsPython) {
  EXPECT_EQ(render("{{ 1 }} {{ -2 }} {{ 1.5 }} {{ 2.0 }} {{ 1e16 }} {{ 0.0001 }} {{ 1.5e-7 }}"),
            "1 -2 1.5 2.0 1e+16 0.0001 1.5e-07");
  EXPECT_EQ(render("{{ true }} {{ False }} {{ none }} {{ None }} {{ 'a' 'b' }}"), "True False None None ab");
  EXPECT_EQ(render("{{ [1, 'x', none, [true]] }} {{ {'k': 'v', 'n': 1} }} {{ () }} {{ (1,) }}"),
            "[1, 'x', None, [True]] {'k': 'v', 'n': 1} () (1,)");
  EXPECT_EQ(render(R"({{ 'a\nb\tc\\d\'e' }}|{{ "\u00e9\x41\101" }})"), "a\nb\tc\\d'e|\xc3\xa9" "AA");
  EXPECT_EQ(render(R"({{ ["it's", 'q"', 'x\ny'] }})"), R"(["it's", 'q"', 'x\ny'])");
}

TEST(ChatTemplate, WhitespaceControlAsTransformersRendersIt) {
  // trim_blocks: one newline after %} goes; lstrip_blocks: indentation before {% goes.
  EXPECT_EQ(render("a\n  {% if true %}\n  b\n  {% endif %}\nc\n"), "a\n  b\nc");
  EXPECT_EQ(render("a  {%- if true -%}  b  {%- endif -%}  c"), "abc");
  EXPECT_EQ(render("a {{- 'x' -}} b"), "axb");
  EXPECT_EQ(render("a {{ 'x' }}\nb"), "a x\nb");  // no trim after }}
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");
  EXPECT_EQ(render("{% if true +%}\nx{% endif %}"), "\nx");
  EXPECT_EQ(render("a\n  {# note #}\nb"), "a\nb");
  EXPECT_EQ(render("x\r\ny\rz\n"), "x\ny\nz");  // newlines normalised, the last one dropped
  EXPECT_EQ(render("{% raw %}{{ x }}{% endraw %}"), "{{ x }}");
}

TEST(ChatTemplate, IfElifElse) {
  const std::string t = "{% if x > 2 %}big{% elif x > 0 %}small{% else %}none{% endif %}";
  EXPECT_EQ(render(t, {{"x", 5}}), "big");
  EXPECT_EQ(render(t, {{"x", 1}}), "small");
  EXPECT_EQ(render(t, {{"x", 0}}), "none");
  EXPECT_EQ(render("{{ 'y' if x else 'n' }}{{ 'z' if x }}", {{"x", false}}), "n");
}

TEST(ChatTemplate, ForLoopVariablesElseAndControl) {
  EXPECT_EQ(render("{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}"
                   "{{ loop.length }}{{ loop.revindex }};{% endfor %}",
                   {{"xs", {7, 8}}}),
            "10TrueFalse22;21FalseTrue21;");
  EXPECT_EQ(render("{% for x in xs %}{{ x }}{% else %}empty{% endfor %}", {{"xs", ojson::array()}}), "empty");
  EXPECT_EQ(render("{% for x in range(10) %}{% if x is odd %}{% continue %}{% endif %}{% if x > 6 %}{% break %}"
                   "{% endif %}{{ x }}{% endfor %}"),
            "0246");
  EXPECT_EQ(render("{% for x in range(6) if x % 3 %}{{ x }}/{{ loop.length }} {% endfor %}"), "1/4 2/4 4/4 5/4 ");
  EXPECT_EQ(render("{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}", {{"d", {{"b", 1}, {"a", 2}}}}),
            "b=1,a=2,");
  EXPECT_EQ(render("{% for k in d %}{{ k }}{% endfor %}{% for c in 'hé' %}[{{ c }}]{% endfor %}",
                   {{"d", {{"x", 1}, {"y", 2}}}}),
            "xy[h][\xc3\xa9]");
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.cycle('a', 'b') }}{{ loop.previtem | default('-') }}{% endfor %}"),
            "a-b1a2");
  // A set inside a loop stays there; a namespace carries it out.
  EXPECT_EQ(render("{% set n = 0 %}{% set ns = namespace(n=0) %}{% for x in [1, 2] %}{% set n = n + x %}"
                   "{% set ns.n = ns.n + x %}{% endfor %}{{ n }} {{ ns.n }}"),
            "0 3");
}

TEST(ChatTemplate, SetMacroFilterBlocks) {
  EXPECT_EQ(render("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = [a, b] %}{{ c }}"), "12[1, 2]");
  EXPECT_EQ(render("{% set s %}  x {{ 1 }}  {% endset %}[{{ s | trim }}]"), "[x 1]");
  EXPECT_EQ(render("{% macro m(a, b='B') %}<{{ a }}{{ b }}>{% endmacro %}{{ m(1) }}{{ m(2, b=3) }}{{ m(b=4, a=5) }}"),
            "<1B><23><54>");
  EXPECT_EQ(render("{% filter upper %}abc {{ 'd' }}{% endfilter %}"), "ABC D");
  EXPECT_EQ(render("{% generation %}kept{% endgeneration %}"), "kept");
}

TEST(ChatTemplate, ExpressionsAndOperators) {
  EXPECT_EQ(render("{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 3 ** 2 }} {{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }}"),
            "3 -4 2 3.5 64 7 9");
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ none }} {{ 'ab' * 2 }} {{ [1] + [2] }} {{ 'x' + 'y' }}"), "a1None abab [1, 2] xy");
  EXPECT_EQ(render("{{ 1 < 2 <= 2 }} {{ 1 == 1.0 }} {{ 'a' != 'b' }} {{ 'b' in 'abc' }} {{ 3 not in [1, 2] }}"),
            "True True True True True");
  EXPECT_EQ(render("{{ 0 or 'x' }} {{ 1 and 'y' }} {{ not none }} {{ [] or 'e' }}"), "x y True e");
  EXPECT_EQ(render("{{ m['role'] }}{{ m.role }}{{ m.nope }}{{ xs[1:] }}{{ xs[-1] }}{{ xs[::-1] }}{{ xs[5] }}",
                   {{"m", {{"role", "user"}}}, {"xs", {1, 2, 3}}}),
            "useruser[2, 3]3[3, 2, 1]");
  EXPECT_EQ(render("{{ 'héllo'[1:3] }}{{ 'abc'[-1] }}"), "\xc3\xa9lc");
  EXPECT_EQ(render("{{ -x | abs }}", {{"x", 3}}), "3");  // (-x)|abs, as jinja2 binds it
}

TEST(ChatTemplate, Tests) {
  EXPECT_EQ(render("{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ n is none }}{{ s is string }}"
                   "{{ d is mapping }}{{ l is iterable }}{{ l is sequence }}{{ 1.5 is number }}{{ t is true }}"
                   "{{ t is false }}{{ 4 is divisibleby(2) }}{{ x is not none }}",
                   {{"x", 1}, {"n", nullptr}, {"s", "s"}, {"d", ojson::object()}, {"l", ojson::array()}, {"t", true}}),
            "TrueFalseTrueTrueTrueTrueTrueTrueTrueTrueFalseTrueTrue");
  EXPECT_EQ(render("{{ 1 is integer }}{{ 1.0 is float }}{{ true is boolean }}{{ 1 is eq 1 }}{{ 'a' is in 'ab' }}"),
            "TrueTrueTrueTrueTrue");
}

TEST(ChatTemplate, Filters) {
  EXPECT_EQ(render("[{{ '  a  ' | trim }}][{{ 'xax' | trim('x') }}]{{ 'aBc' | upper }}{{ 'aBc' | lower }}"
                   "{{ 'hello big-world' | title }}{{ 'hELLO' | capitalize }}"),
            "[a][a]ABCabcHello Big-WorldHello");
  EXPECT_EQ(render("{{ xs | length }}{{ xs | count }}{{ xs | first }}{{ xs | last }}{{ xs | join('-') }}"
                   "{{ xs | list }}{{ 'ab' | list }}",
                   {{"xs", {1, 2, 3}}}),
            "33131-2-3[1, 2, 3]['a', 'b']");
  EXPECT_EQ(render("{{ u | default('d') }}{{ '' | default('e') }}{{ '' | default('e', true) }}{{ u | d('f') }}"), "def");
  EXPECT_EQ(render("{{ 'aaa' | replace('a', 'b') }}{{ 'aaa' | replace('a', 'b', 1) }}{{ 'x' | safe }}{{ 3 | string }}"
                   "{{ '7' | int + 1 }}{{ 'q' | int }}{{ 2.9 | int }}{{ '1.5' | float }}"),
            "bbbbaax38021.5");
  EXPECT_EQ(render("{{ d | items | list }} {{ d | dictsort }}", {{"d", {{"b", 1}, {"a", 2}}}}),
            "[('b', 1), ('a', 2)] [('a', 2), ('b', 1)]");
  const ojson msgs = {{{"role", "user"}, {"n", 1}}, {{"role", "system"}, {"n", 2}}, {{"role", "user"}, {"n", 3}}};
  EXPECT_EQ(render("{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='n') | list }}"
                   "{{ ms | rejectattr('role', 'eq', 'user') | map(attribute='role') | join }}"
                   "{{ ms | map(attribute='n') | sum }}{{ ms | map(attribute='nope', default=0) | list }}"
                   "{{ [0, 1, 2] | select('odd') | list }}{{ ms | selectattr('n') | list | length }}",
                   {{"ms", msgs}}),
            "[1, 3]system6[0, 0, 0][1]3");
  EXPECT_EQ(render("{{ [3, 1, 2] | sort }}{{ ['b', 'A'] | sort }}{{ [1, 1, 2] | unique | list }}{{ [1, 2] | reverse | list }}"
                   "{{ [4, 9, 1] | max }}{{ [4, 9, 1] | min }}{{ 2.5 | round }}{{ 1.25 | round(1, 'floor') }}"),
            "[1, 2, 3]['A', 'b'][1, 2][2, 1]912.01.2");
  EXPECT_EQ(render("{{ 'a\nb\n\nc' | indent(2) }}|{{ 'a\nb' | indent(2, true) }}"), "a\n  b\n\n  c|  a\n  b");
  EXPECT_EQ(render("{{ '<&>' | e }}"), "&lt;&amp;&gt;");
  // markupsafe, as jinja2 without autoescape still has it: Markup + str escapes the str.
  EXPECT_EQ(render("{{ '<a>' + ('x' | safe) }}|{{ ('x' | safe) + '<' }}|{{ '<' ~ ('x' | safe) }}|{{ ('<' | safe) | e }}"),
            "&lt;a&gt;x|x&lt;|<x|<");
}

TEST(ChatTemplate, ToJsonAsTransformersDefinesIt) {
  const ojson v = {{"z", "é\"\n"}, {"a", {1, 2.5, nullptr, true}}, {"e", ojson::object()}, {"l", ojson::array()}};
  EXPECT_EQ(render("{{ v | tojson }}", {{"v", v}}),
            R"({"z": "é\"\n", "a": [1, 2.5, null, true], "e": {}, "l": []})");
  EXPECT_EQ(render("{{ v | tojson(sort_keys=true) }}", {{"v", v}}),
            R"({"a": [1, 2.5, null, true], "e": {}, "l": [], "z": "é\"\n"})");
  EXPECT_EQ(render("{{ v | tojson(indent=2) }}", {{"v", {{"a", {1}}, {"b", "x"}}}}),
            "{\n  \"a\": [\n    1\n  ],\n  \"b\": \"x\"\n}");
  EXPECT_EQ(render("{{ 'é' | tojson(ensure_ascii=true) }}{{ '🙂' | tojson(true) }}"), R"("\u00e9""\ud83d\ude42")");
  EXPECT_EQ(render("{{ [1, 2] | tojson(separators=[',', ':']) }}"), "[1,2]");
}

TEST(ChatTemplate, MethodsOfStringsAndDicts) {
  EXPECT_EQ(render("[{{ ' a '.strip() }}][{{ ' a '.lstrip() }}][{{ ' a '.rstrip() }}][{{ 'xay'.strip('xy') }}]"),
            "[a][a ][ a][a]");
  EXPECT_EQ(render("{{ ' a  b '.split() }}{{ 'a,b'.split(',') }}{{ 'a b c'.split(' ', 1) }}{{ 'a b c'.rsplit(' ', 1) }}"),
            "['a', 'b']['a', 'b']['a', 'b c']['a b', 'c']");
  EXPECT_EQ(render("{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith('bc') }}{{ 'aB'.upper() }}{{ 'aB'.lower() }}"
                   "{{ 'aXa'.replace('a', 'b') }}{{ 'abc'.find('c') }}{{ '-'.join(['a', 'b']) }}"),
            "TrueTrueABabbXb2a-b");
  EXPECT_EQ(render("{{ d.get('a') }}{{ d.get('z', 0) }}{{ d.get('z') }}{{ d.keys() | list }}{{ d.values() | list }}"
                   "{{ d.items() | list }}",
                   {{"d", {{"a", 1}}}}),
            "10None['a'][1][('a', 1)]");
}

TEST(ChatTemplate, UndefinedBehavesAsJinja2Default) {
  EXPECT_EQ(render("[{{ u }}][{{ u | length }}][{{ u is defined }}][{% for x in u %}x{% endfor %}][{{ 'y' if u else 'n' }}]"
                   "[{{ u ~ 'z' }}][{{ m.nope }}][{{ m.nope is defined }}][{{ u == u }}][{{ 'a' in u }}]",
                   {{"m", ojson::object()}}),
            "[][0][False][][n][z][][False][True][False]");
  // As jinja2's default Undefined: using an undefined value beyond printing, testing and iterating fails.
  EXPECT_NE(error_of("{{ u.attr }}").find("'u' is undefined"), std::string::npos);
  EXPECT_NE(error_of("{{ u + 1 }}").find("'u' is undefined"), std::string::npos);
  EXPECT_NE(error_of("{{ m.a.b }}", {{"m", ojson::object()}}).find("has no attribute 'a'"), std::string::npos);
  EXPECT_NE(error_of("{{ u | tojson }}").find("not JSON serializable"), std::string::npos);
}

TEST(ChatTemplate, GlobalsRaiseExceptionAndStrftimeNow) {
  const std::string e = error_of("line one\n{{ raise_exception('Conversation roles must alternate') }}");
  EXPECT_NE(e.find("chat template line 2"), std::string::npos) << e;
  EXPECT_NE(e.find("Conversation roles must alternate"), std::string::npos) << e;
  EXPECT_EQ(render("{{ strftime_now('%Y-%m-%d %H:%M:%S %d %b %Y %B') }}"), "2026-01-15 09:30:05 15 Jan 2026 January");
  EXPECT_EQ(render("{{ range(3) | list }}{{ range(1, 7, 2) | list }}{{ namespace(a=1).a }}{{ dict(x=2) }}"),
            "[0, 1, 2][1, 3, 5]1{'x': 2}");
}

TEST(ChatTemplate, SyntaxErrorsNameTheLine) {
  std::string e = error_of("ok\nok\n{% if x %}\nno end");
  EXPECT_NE(e.find("line 3"), std::string::npos) << e;
  EXPECT_NE(e.find("'endif'"), std::string::npos) << e;
  e = error_of("a\n{{ x | no_such_filter }}");
  EXPECT_NE(e.find("line 2"), std::string::npos) << e;
  EXPECT_NE(e.find("no filter named 'no_such_filter'"), std::string::npos) << e;
  e = error_of("{{ x is no_such_test }}");
  EXPECT_NE(e.find("no test named 'no_such_test'"), std::string::npos) << e;
  e = error_of("\n\n{% frobnicate %}");
  EXPECT_NE(e.find("line 3"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown or unsupported tag 'frobnicate'"), std::string::npos) << e;
  EXPECT_NE(error_of("{{ 'unterminated }}").find("unterminated string"), std::string::npos);
  EXPECT_NE(error_of("{{ (1 }}").find("expected"), std::string::npos);
  EXPECT_NE(error_of("{{ x").find("not closed"), std::string::npos);
  EXPECT_NE(error_of("{# x").find("comment"), std::string::npos);
  EXPECT_NE(error_of("{% break %}").find("outside of a for loop"), std::string::npos);
  EXPECT_NE(error_of("{% include 'x' %}").find("unsupported tag 'include'"), std::string::npos);
  // The for loop's `if` is a filter, so an else after it is a syntax error (as in jinja2).
  EXPECT_NE(error_of("{% for x in a if b else c %}{% endfor %}").find("'else'"), std::string::npos);
}

TEST(ChatTemplate, RuntimeErrorsNameTheLine) {
  std::string e = error_of("\n{{ 1 + 'a' }}");
  EXPECT_NE(e.find("line 2"), std::string::npos) << e;
  EXPECT_NE(e.find("unsupported operand"), std::string::npos) << e;
  EXPECT_NE(error_of("{{ 1 // 0 }}").find("by zero"), std::string::npos);
  EXPECT_NE(error_of("{{ 5() }}").find("not callable"), std::string::npos);
  EXPECT_NE(error_of("{{ 3 | first }}").find("not iterable"), std::string::npos);
  EXPECT_NE(error_of("{% set x = 1 %}{% set x.a = 2 %}").find("non-namespace"), std::string::npos);
  EXPECT_NE(error_of("{{ 9223372036854775807 + 1 }}").find("overflow"), std::string::npos);
  EXPECT_NE(error_of("{{ 1 < 'a' }}").find("not supported between"), std::string::npos);
}

TEST(ChatTemplate, NestingStepsAndOutputAreBounded) {
  // Deep nesting is an error, not a stack overflow.
  std::string deep;
  for (int k = 0; k < 5000; ++k) deep += "{% if true %}";
  EXPECT_NE(error_of(deep).find("nests deeper"), std::string::npos);
  EXPECT_NE(error_of("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").find("deeper"),
            std::string::npos);
  EXPECT_NE(error_of("{{ " + std::string(5000, '-') + "1 }}").find("deeper"), std::string::npos);
  EXPECT_NE(error_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").find("nest deeper"), std::string::npos);
  // Runaway loops and output stop at the limits.
  ChatTemplateLimits small;
  small.max_steps = 100000;
  EXPECT_NE(error_of("{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}", ojson::object(), small)
                .find("steps"),
            std::string::npos);
  ChatTemplateLimits tiny;
  tiny.max_output = 1000;
  EXPECT_NE(error_of("{% for a in range(100) %}0123456789abcdef{% endfor %}", ojson::object(), tiny).find("exceeds"),
            std::string::npos);
  EXPECT_NE(error_of("{{ 'x' * 100000 }}", ojson::object(), tiny).find("exceeds"), std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                     ojson::object(), tiny)
                .find("exceeds"),
            std::string::npos);
  EXPECT_NE(error_of("{{ range(1000000) | length }}").find("range too big"), std::string::npos);
  // A namespace holding itself prints as an error, not a crash (and is freed).
  EXPECT_NE(error_of("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}").find("deeper"), std::string::npos);
  // Chains parsed in a loop (1 + 1 + ..., x|f|f..., a.b.c...) are bounded too: evaluating or
  // freeing them recurses as deep as they are long.
  std::string chain = "{{ 1";
  for (int k = 0; k < 100000; ++k) chain += " + 1";
  EXPECT_NE(error_of(chain + " }}").find("nests deeper"), std::string::npos);
  std::string filters = "{{ 'x'";
  for (int k = 0; k < 100000; ++k) filters += " | trim";
  EXPECT_NE(error_of(filters + " }}").find("nests deeper"), std::string::npos);
  std::string attrs = "{{ m";
  for (int k = 0; k < 100000; ++k) attrs += ".a";
  EXPECT_NE(error_of(attrs + " }}").find("nests deeper"), std::string::npos);
  // Values nested 300,000 deep through a namespace are built and freed without recursion.
  EXPECT_EQ(render("{% set ns = namespace(x=[], n=none) %}{% for i in range(100000) %}{% for j in range(3) %}"
                   "{% set ns.x = [ns.x] %}{% set ns.n = namespace(prev=ns.n) %}{% endfor %}{% endfor %}done"),
            "done");
  EXPECT_NE(error_of("{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}"
                     "{{ ns.x }}")
                .find("deeper"),
            std::string::npos);
  // A recursive macro that nests deep expressions stops at the evaluation depth bound.
  const std::string e = error_of("{% macro f(n) %}{{ " + std::string(100, '-') + "f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_NE(e.find("recurses deeper than 512 evaluations"), std::string::npos) << e;
}

TEST(ChatTemplate, ReadsTheModelFoldersTemplate) {
  const fs::path dir = fs::temp_directory_path() / ("hm_chat_template_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) { std::ofstream(dir / name) << text; };
  // No template: empty.
  EXPECT_TRUE(read_chat_template(dir.string()).empty());
  write("tokenizer_config.json",
        R"({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null,
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"})");
  HfChatTemplate t = read_chat_template(dir.string());
  EXPECT_FALSE(t.empty());
  EXPECT_EQ(t.special_tokens["bos_token"], "<s>");
  EXPECT_EQ(t.special_tokens["eos_token"], "</s>");
  ChatFormat f(t);
  EXPECT_EQ(f.apply(nlohmann::json::array({{{"role", "user"}, {"content", "hi"}}})), "<s>[user]hi</s>");
  // The list form: "default", or "tool_use" when tools are given.
  write("tokenizer_config.json",
        R"({"eos_token": "</s>", "chat_template": [{"name": "tool_use", "template": "T{{ tools | length }}"},
            {"name": "default", "template": "D{{ add_generation_prompt }}"}]})");
  EXPECT_EQ(ChatFormat(read_chat_template(dir.string())).apply(nlohmann::json::array(), true), "DTrue");
  EXPECT_EQ(ChatFormat(read_chat_template(dir.string(), true)).apply(nlohmann::json::array(), false, {1, 2}), "T2");
  // chat_template.jinja wins over tokenizer_config.json.
  write("chat_template.jinja", "J{{ messages | length }}\n");
  EXPECT_EQ(ChatFormat(read_chat_template(dir.string())).apply(nlohmann::json::array()), "J0");
  // A checkpoint written from the folder takes its template files along.
  const fs::path out = dir / "converted";
  fs::create_directories(out);
  write("generation_config.json", R"({"eos_token_id": [2, 5]})");  // stop tokens go along too
  EXPECT_EQ(copy_chat_template_files(dir.string(), out.string()), 3);
  EXPECT_EQ(ChatFormat(read_chat_template(out.string())).apply(nlohmann::json::array()), "J0");
  EXPECT_EQ(copy_chat_template_files(out.string(), out.string()), 0);  // onto itself: nothing to do
  // Errors name the file.
  write("chat_template.jinja", "{% if %}");
  try {
    ChatFormat bad(read_chat_template(dir.string()));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("chat_template.jinja"), std::string::npos) << e.what();
  }
  fs::remove(dir / "chat_template.jinja");
  write("tokenizer_config.json", R"({"chat_template": [{"name": "other", "template": "x"}]})");
  EXPECT_THROW(read_chat_template(dir.string()), Error);
  write("tokenizer_config.json", R"({"chat_template": 5})");
  EXPECT_THROW(read_chat_template(dir.string()), Error);
  fs::remove_all(dir);
}

// Random token soups and mutated fixture templates: each parses and renders, or fails with
// hm::Error; nothing else escapes, nothing crashes or hangs (tests/fuzz/fuzz_chat_template.cpp
// is the libFuzzer version).
TEST(ChatTemplate, RandomAndMutatedTemplatesEndInOutputOrError) {
  const char* pieces[] = {"{{", "}}", "{%", "%}", "{%-", "-%}", "{#", "#}", "if ", "elif ", "else", "endif", "for ",
                          "endfor", " in ", "set ", "endset", "macro ", "endmacro", "raw", "endraw", "break", "continue",
                          "filter ", "endfilter", "messages", "m", "x", "loop.", "index", "last", "ns", "namespace(",
                          "a=1", ")", "(", "[", "]", "{", "}", "|", "tojson", "trim", "length", "map(attribute='role')",
                          "join(',')", "default(", "'s'", "\"d\"", "1", "2.5", "-", "+", "*", "/", "//", "%", "**",
                          "~", ".", ",", ":", "=", "==", "<", " is ", "not ", "defined", "none", "true", " and ",
                          " or ", "raise_exception('r')", "range(", "strftime_now('%Y')", " ", "\n", "'", "\"", "\\"};
  const ojson vars = {{"messages", {{{"role", "user"}, {"content", "hi"}}, {{"role", "assistant"}, {"content", nullptr}}}},
                      {"add_generation_prompt", true},
                      {"bos_token", "<s>"}};
  ChatTemplateLimits lim;
  lim.max_steps = 200000;
  lim.max_output = 1 << 20;
  uint64_t state = 12345;
  auto rnd = [&](uint64_t n) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (state >> 33) % n;
  };
  int rendered = 0, refused = 0;
  auto attempt = [&](const std::string& src) {
    try {
      ChatTemplate t(src, lim);
      t.set_clock(fixed_now);
      EXPECT_LE(t.render(vars).size(), lim.max_output);
      ++rendered;
    } catch (const Error&) {
      ++refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not an hm::Error: " << e.what() << " from: " << src;
    }
  };
  for (int k = 0; k < 4000; ++k) {
    std::string src;
    const uint64_t n = 1 + rnd(40);
    for (uint64_t j = 0; j < n; ++j) src += pieces[rnd(std::size(pieces))];
    attempt(src);
  }
  std::vector<std::string> fixtures;
  for (const auto& f : fs::directory_iterator(kDir))
    if (f.path().extension() == ".jinja") fixtures.push_back(slurp(f.path().string()));
  for (int k = 0; k < 1500; ++k) {
    std::string src = fixtures[rnd(fixtures.size())];
    for (uint64_t m = 1 + rnd(4); m-- > 0 && !src.empty();) {
      const size_t at = rnd(src.size());
      switch (rnd(4)) {
        case 0: src.erase(at, 1 + rnd(8)); break;
        case 1: src.insert(at, pieces[rnd(std::size(pieces))]); break;
        case 2: src[at] = char(rnd(256)); break;
        default: src.insert(at, src.substr(rnd(src.size()), rnd(40))); break;
      }
    }
    attempt(src);
  }
  EXPECT_GT(rendered, 100);
  EXPECT_GT(refused, 100);
}

}  // namespace
}  // namespace hm
