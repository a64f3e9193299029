#include "runtime/text_regex.h"

#include <algorithm>
#include <cstdint>

#include "core/error.h"
#include "runtime/tokenizer.h"
#include "runtime/unicode.h"

namespace hm {

namespace {

using Cat = GeneralCategory;
constexpr uint32_t bit(Cat c) { return uint32_t(1) << int(c); }
constexpr uint32_t kL = bit(Cat::Lu) | bit(Cat::Ll) | bit(Cat::Lt) | bit(Cat::Lm) | bit(Cat::Lo);
constexpr uint32_t kM = bit(Cat::Mn) | bit(Cat::Mc) | bit(Cat::Me);
constexpr uint32_t kN = bit(Cat::Nd) | bit(Cat::Nl) | bit(Cat::No);
constexpr uint32_t kP = bit(Cat::Pc) | bit(Cat::Pd) | bit(Cat::Ps) | bit(Cat::Pe) | bit(Cat::Pi) | bit(Cat::Pf) |
                        bit(Cat::Po);
constexpr uint32_t kS = bit(Cat::Sm) | bit(Cat::Sc) | bit(Cat::Sk) | bit(Cat::So);
constexpr uint32_t kZ = bit(Cat::Zs) | bit(Cat::Zl) | bit(Cat::Zp);
constexpr uint32_t kC = bit(Cat::Cc) | bit(Cat::Cf) | bit(Cat::Cs) | bit(Cat::Co) | bit(Cat::Cn);
constexpr uint32_t kAll = (uint32_t(1) << kGeneralCategories) - 1;
// Oniguruma's Unicode \w: letters, marks, numbers (all of N, so ½ and Ⅻ), connector punctuation.
constexpr uint32_t kWord = kL | kM | kN | bit(Cat::Pc);

constexpr uint64_t kStepLimit = 10'000'000;  // Oniguruma's ONIG_DEFAULT_RETRY_LIMIT_IN_MATCH
constexpr uint64_t kStepsPerChar = 2000;     // tokenizers' patterns take a few
constexpr int kDepthLimit = 4000;            // nested calls per attempt, well inside the stack

// One item of a character class; it matches c when c is in it, or not, if negated.
struct Item {
  enum Kind { Range, Cats, Space } kind;
  char32_t lo = 0, hi = 0;
  uint32_t cats = 0;
  bool negated = false;
  bool test(char32_t c) const {
    bool in;
    switch (kind) {
      case Range: in = c >= lo && c <= hi; break;
      case Cats: in = (cats >> int(general_category(c))) & 1u; break;
      default: in = is_space(c);
    }
    return in != negated;
  }
};

struct Node {
  enum Kind { Set, Group, Repeat, Look, Anchor } kind;
  // Set: a single character.
  std::vector<Item> items;
  bool negated = false;
  // Group and Look: alternatives, each a sequence of node indices.
  std::vector<std::vector<int>> alts;
  bool look_negated = false;
  // Repeat: child repeated [min, max] times (max < 0: unbounded).
  int child = -1, min = 0, max = -1;
  bool greedy = true;
  // Anchor: ^ $ (Ruby's: at line boundaries), \A, \z, \Z.
  enum AnchorKind { LineStart, LineEnd, TextStart, TextEnd, TextEndOrNewline } anchor = LineStart;
  std::vector<int> self;  // {index of this node}: one node as a sequence

  bool test(char32_t c) const {
    bool in = false;
    for (const Item& it : items)
      if (it.test(c)) {
        in = true;
        break;
      }
    return in != negated;
  }
};

}  // namespace

struct TextRegex::Program {
  std::vector<Node> nodes;
  int root = -1;
};

namespace {

class Parser {
 public:
  Parser(std::string_view pattern, TextRegex::Program& prog) : pattern_(pattern), prog_(prog) {
    HM_CHECK(is_valid_utf8(pattern), "tokenizer: regex is not valid UTF-8");
    to_code_points(pattern, p_, nullptr);
  }

  int parse() {
    bool icase = false;
    const int root = group(icase);
    if (i_ < p_.size()) fail("an unmatched ')'");
    return root;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(detail::cat("tokenizer: regex /", pattern_, "/ at character ", i_, ": ", what,
                            " is not supported (see src/runtime/text_regex.h)"));
  }
  bool at(char32_t c) const { return i_ < p_.size() && p_[i_] == c; }
  bool more() const { return i_ < p_.size(); }

  int add(Node n) {
    prog_.nodes.push_back(std::move(n));
    const int id = int(prog_.nodes.size()) - 1;
    prog_.nodes.back().self = {id};
    return id;
  }

  // Alternatives up to a ')' or the end; (?i) inside turns case folding on to the group's end.
  int group(bool icase) {
    Node g;
    g.kind = Node::Group;
    g.alts.emplace_back();
    while (more() && !at(')')) {
      if (at('|')) {
        ++i_;
        g.alts.emplace_back();
        continue;
      }
      if (at('(') && i_ + 2 < p_.size() && p_[i_ + 1] == '?' && (p_[i_ + 2] == 'i' || p_[i_ + 2] == '-')) {
        // (?i) or (?-i) alone: a flag for the rest of this group.
        const size_t save = i_;
        i_ += 2;
        const bool on = p_[i_] == 'i';
        i_ += on ? 1 : 2;
        if (!on && (i_ - 1 >= p_.size() || p_[i_ - 1] != 'i')) fail("an inline flag other than i");
        if (at(')')) {
          ++i_;
          icase = on;
          continue;
        }
        i_ = save;
      }
      const int atom_id = atom(icase);
      g.alts.back().push_back(quantified(atom_id));
    }
    return add(std::move(g));
  }

  int quantified(int id) {
    while (more()) {
      int mn, mx;
      const size_t save = i_;
      if (at('?')) mn = 0, mx = 1, ++i_;
      else if (at('*')) mn = 0, mx = -1, ++i_;
      else if (at('+')) mn = 1, mx = -1, ++i_;
      else if (at('{') && interval(mn, mx)) {
      } else {
        break;
      }
      bool greedy = true;
      if (at('?')) greedy = false, ++i_;
      else if (at('+') && p_[save] != '{') fail("a possessive quantifier");
      Node r;
      r.kind = Node::Repeat;
      r.child = id, r.min = mn, r.max = mx, r.greedy = greedy;
      id = add(std::move(r));
    }
    return id;
  }

  // {n} {n,} {n,m} {,m}; false (nothing consumed) when the brace does not start one, where
  // Oniguruma reads it as a literal.
  bool interval(int& mn, int& mx) {
    size_t k = i_ + 1;
    auto number = [&](int& v) {
      const size_t s = k;
      v = 0;
      while (k < p_.size() && p_[k] >= '0' && p_[k] <= '9') {
        if (v > 100000) fail("a repeat count above 100000");  // Oniguruma's limit too
        v = v * 10 + int(p_[k++] - '0');
      }
      return k > s;
    };
    int a = 0, b = -1;
    const bool has_a = number(a);
    if (k < p_.size() && p_[k] == '}') {
      if (!has_a) return false;
      b = a;
    } else if (k < p_.size() && p_[k] == ',') {
      ++k;
      const bool has_b = number(b);
      if (!has_a && !has_b) return false;
      if (!has_b) b = -1;
      if (k >= p_.size() || p_[k] != '}') return false;
    } else {
      return false;
    }
    if (a > 100000 || b > 100000) fail("a repeat count above 100000");
    if (b >= 0 && b < a) fail("an interval {n,m} with m < n");
    i_ = k + 1;
    mn = a, mx = b;
    return true;
  }

  int atom(bool icase) {
    const char32_t c = p_[i_];
    if (c == '(') return paren(icase);
    if (c == '[') return cls(icase);
    if (c == '.') {
      ++i_;
      Node n;
      n.kind = Node::Set;
      n.negated = true;
      n.items.push_back({Item::Range, '\n', '\n'});
      return add(std::move(n));
    }
    if (c == '*' || c == '+' || c == '?') fail("a quantifier with nothing to repeat");
    Node n;
    if (c == '^' || c == '$') {
      ++i_;
      n.kind = Node::Anchor;
      n.anchor = c == '^' ? Node::LineStart : Node::LineEnd;
      return add(std::move(n));
    }
    n.kind = Node::Set;
    if (c == '\\' && i_ + 1 < p_.size() && (p_[i_ + 1] == 'A' || p_[i_ + 1] == 'z' || p_[i_ + 1] == 'Z')) {
      n.kind = Node::Anchor;
      n.anchor = p_[i_ + 1] == 'A' ? Node::TextStart : p_[i_ + 1] == 'z' ? Node::TextEnd : Node::TextEndOrNewline;
      i_ += 2;
      return add(std::move(n));
    }
    if (c == '\\') {
      ++i_;
      escape(n.items, n.negated, /*in_class=*/false);
    } else {
      ++i_;
      n.items.push_back({Item::Range, c, c});
    }
    fold(n.items, icase);
    return add(std::move(n));
  }

  int paren(bool icase) {
    ++i_;  // (
    Node look;
    bool is_look = false;
    if (at('?')) {
      ++i_;
      if (at(':')) {
        ++i_;
      } else if (at('=') || at('!')) {
        is_look = true;
        look.look_negated = at('!');
        ++i_;
      } else if (at('<') && i_ + 1 < p_.size() && (p_[i_ + 1] == '=' || p_[i_ + 1] == '!')) {
        fail("lookbehind");
      } else if (at('<')) {  // named group: captures do not matter here
        while (more() && !at('>')) ++i_;
        if (!more()) fail("an unterminated group name");
        ++i_;
      } else if (at('i') || at('-')) {
        const bool on = at('i');
        i_ += on ? 1 : 2;
        if (!on && p_[i_ - 1] != 'i') fail("an inline flag other than i");
        if (!at(':')) fail("a flag group other than (?i:...) and (?-i:...)");
        ++i_;
        icase = on;
      } else {
        fail("this (? group");
      }
    }
    const int g = group(icase);
    if (!at(')')) fail("a missing ')'");
    ++i_;
    if (!is_look) return g;
    look.kind = Node::Look;
    look.alts = prog_.nodes[size_t(g)].alts;
    return add(std::move(look));
  }

  int cls(bool icase) {
    ++i_;  // [
    Node n;
    n.kind = Node::Set;
    if (at('^')) n.negated = true, ++i_;
    bool first = true;
    while (more() && (!at(']') || first)) {
      first = false;
      if (at('[')) fail("a nested class or POSIX bracket");
      if (at('&') && i_ + 1 < p_.size() && p_[i_ + 1] == '&') fail("class intersection &&");
      std::vector<Item> one;
      bool neg = false;
      char32_t lo;
      if (at('\\')) {
        ++i_;
        escape(one, neg, /*in_class=*/true);
        if (neg) for (Item& it : one) it.negated = !it.negated;  // \S inside a class
        if (one.size() != 1 || one[0].kind != Item::Range || one[0].lo != one[0].hi || one[0].negated) {
          n.items.insert(n.items.end(), one.begin(), one.end());
          continue;
        }
        lo = one[0].lo;
      } else {
        lo = p_[i_++];
      }
      char32_t hi = lo;
      if (at('-') && i_ + 1 < p_.size() && p_[i_ + 1] != ']') {
        ++i_;
        if (at('\\')) {
          ++i_;
          std::vector<Item> end;
          bool eneg = false;
          escape(end, eneg, true);
          if (eneg || end.size() != 1 || end[0].kind != Item::Range || end[0].lo != end[0].hi)
            fail("a range ending in a class escape");
          hi = end[0].lo;
        } else {
          hi = p_[i_++];
        }
        if (hi < lo) fail("a range whose end is below its start");
      }
      n.items.push_back({Item::Range, lo, hi});
    }
    if (!at(']')) fail("an unterminated class");
    ++i_;
    fold(n.items, icase);
    return add(std::move(n));
  }

  // After a backslash: appends what it stands for; negated is set for \D \W \S \H \P (outside
  // a class the caller negates the whole set; inside, the item).
  void escape(std::vector<Item>& items, bool& negated, bool in_class) {
    if (!more()) fail("a trailing backslash");
    const char32_t c = p_[i_++];
    auto lit = [&](char32_t v) { items.push_back({Item::Range, v, v}); };
    auto hex = [&](size_t max_digits, bool braced) {
      char32_t v = 0;
      size_t k = 0;
      while (k < max_digits && more()) {
        const char32_t h = p_[i_];
        const int d = h >= '0' && h <= '9' ? int(h - '0') : h >= 'a' && h <= 'f' ? int(h - 'a' + 10)
                      : h >= 'A' && h <= 'F' ? int(h - 'A' + 10) : -1;
        if (d < 0) break;
        v = v * 16 + char32_t(d), ++i_, ++k;
      }
      if (k == 0 || v > 0x10FFFF) fail("a malformed hex escape");
      if (braced) {
        if (!at('}')) fail("an unterminated \\x{...}");
        ++i_;
      }
      return v;
    };
    switch (c) {
      case 't': return lit('\t');
      case 'n': return lit('\n');
      case 'r': return lit('\r');
      case 'f': return lit('\f');
      case 'v': return lit('\v');
      case 'a': return lit('\a');
      case 'e': return lit(0x1B);
      case 'x':
        if (at('{')) {
          ++i_;
          return lit(hex(8, true));
        }
        return lit(hex(2, false));
      case 'u': return lit(hex(4, false));
      case 'd': case 'D':
        negated = c == 'D';
        items.push_back({Item::Cats, 0, 0, bit(Cat::Nd)});
        return;
      case 'w': case 'W':
        negated = c == 'W';
        items.push_back({Item::Cats, 0, 0, kWord});
        return;
      case 's': case 'S':
        negated = c == 'S';
        items.push_back({Item::Space});
        return;
      case 'h': case 'H':  // Ruby syntax: a hexadecimal digit
        negated = c == 'H';
        items.push_back({Item::Range, '0', '9'});
        items.push_back({Item::Range, 'a', 'f'});
        items.push_back({Item::Range, 'A', 'F'});
        if (in_class && negated) fail("\\H inside a class");
        return;
      case 'p': case 'P': {
        negated = c == 'P';
        if (!at('{')) fail("\\p without {...}");
        ++i_;
        if (at('^')) negated = !negated, ++i_;
        std::string name;
        while (more() && !at('}')) {
          const char32_t k = p_[i_++];
          if (k == ' ' || k == '_' || k == '-') continue;  // Oniguruma ignores these in names
          if (k >= 0x80) fail("a non-ASCII property name");
          name += char(k >= 'A' && k <= 'Z' ? k + 32 : k);
        }
        if (!at('}')) fail("an unterminated \\p{...}");
        ++i_;
        items.push_back({Item::Cats, 0, 0, category_mask(name)});
        return;
      }
      default:
        break;
    }
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
      fail(detail::cat("the escape \\", char(c)));
    lit(c);  // escaped punctuation or any other character stands for itself
  }

  uint32_t category_mask(const std::string& name) {
    struct Named { const char* name; uint32_t mask; };
    static const Named kNames[] = {
        {"any", kAll}, {"l", kL}, {"letter", kL}, {"lc", bit(Cat::Lu) | bit(Cat::Ll) | bit(Cat::Lt)},
        {"l&", bit(Cat::Lu) | bit(Cat::Ll) | bit(Cat::Lt)}, {"casedletter", bit(Cat::Lu) | bit(Cat::Ll) | bit(Cat::Lt)},
        {"lu", bit(Cat::Lu)}, {"uppercaseletter", bit(Cat::Lu)}, {"ll", bit(Cat::Ll)}, {"lowercaseletter", bit(Cat::Ll)},
        {"lt", bit(Cat::Lt)}, {"titlecaseletter", bit(Cat::Lt)}, {"lm", bit(Cat::Lm)}, {"modifierletter", bit(Cat::Lm)},
        {"lo", bit(Cat::Lo)}, {"otherletter", bit(Cat::Lo)},
        {"m", kM}, {"mark", kM}, {"combiningmark", kM}, {"mn", bit(Cat::Mn)}, {"nonspacingmark", bit(Cat::Mn)},
        {"mc", bit(Cat::Mc)}, {"spacingmark", bit(Cat::Mc)}, {"me", bit(Cat::Me)}, {"enclosingmark", bit(Cat::Me)},
        {"n", kN}, {"number", kN}, {"nd", bit(Cat::Nd)}, {"decimalnumber", bit(Cat::Nd)}, {"digit", bit(Cat::Nd)},
        {"nl", bit(Cat::Nl)}, {"letternumber", bit(Cat::Nl)}, {"no", bit(Cat::No)}, {"othernumber", bit(Cat::No)},
        {"p", kP}, {"punctuation", kP}, {"punct", kP}, {"pc", bit(Cat::Pc)}, {"connectorpunctuation", bit(Cat::Pc)},
        {"pd", bit(Cat::Pd)}, {"dashpunctuation", bit(Cat::Pd)}, {"ps", bit(Cat::Ps)}, {"openpunctuation", bit(Cat::Ps)},
        {"pe", bit(Cat::Pe)}, {"closepunctuation", bit(Cat::Pe)}, {"pi", bit(Cat::Pi)}, {"initialpunctuation", bit(Cat::Pi)},
        {"pf", bit(Cat::Pf)}, {"finalpunctuation", bit(Cat::Pf)}, {"po", bit(Cat::Po)}, {"otherpunctuation", bit(Cat::Po)},
        {"s", kS}, {"symbol", kS}, {"sm", bit(Cat::Sm)}, {"mathsymbol", bit(Cat::Sm)}, {"sc", bit(Cat::Sc)},
        {"currencysymbol", bit(Cat::Sc)}, {"sk", bit(Cat::Sk)}, {"modifiersymbol", bit(Cat::Sk)}, {"so", bit(Cat::So)},
        {"othersymbol", bit(Cat::So)},
        {"z", kZ}, {"separator", kZ}, {"zs", bit(Cat::Zs)}, {"spaceseparator", bit(Cat::Zs)}, {"zl", bit(Cat::Zl)},
        {"lineseparator", bit(Cat::Zl)}, {"zp", bit(Cat::Zp)}, {"paragraphseparator", bit(Cat::Zp)},
        {"c", kC}, {"other", kC}, {"cc", bit(Cat::Cc)}, {"control", bit(Cat::Cc)}, {"cntrl", bit(Cat::Cc)},
        {"cf", bit(Cat::Cf)}, {"format", bit(Cat::Cf)}, {"cs", bit(Cat::Cs)}, {"surrogate", bit(Cat::Cs)},
        {"co", bit(Cat::Co)}, {"privateuse", bit(Cat::Co)}, {"cn", bit(Cat::Cn)}, {"unassigned", bit(Cat::Cn)},
    };
    for (const Named& n : kNames)
      if (name == n.name) return n.mask;
    fail(detail::cat("the property \\p{", name, "} (general categories only; no scripts or binary properties)"));
  }

  // Case-insensitive: ASCII letters match both cases; a cased non-ASCII literal is refused.
  void fold(std::vector<Item>& items, bool icase) {
    if (!icase) return;
    const size_t n = items.size();
    for (size_t k = 0; k < n; ++k) {
      const Item it = items[k];
      if (it.kind != Item::Range) continue;
      for (char32_t base : {char32_t('a'), char32_t('A')}) {
        const char32_t lo = std::max(it.lo, base), hi = std::min(it.hi, char32_t(base + 25));
        if (lo <= hi) items.push_back({Item::Range, lo ^ 0x20, hi ^ 0x20, 0, it.negated});
      }
      for (char32_t c = std::max<char32_t>(it.lo, 0x80); c <= it.hi; ++c) {
        const Cat g = general_category(c);
        if (g == Cat::Lu || g == Cat::Ll || g == Cat::Lt) fail("case-insensitive matching of non-ASCII letters");
      }
    }
  }

  std::string_view pattern_;
  TextRegex::Program& prog_;
  std::vector<char32_t> p_;
  size_t i_ = 0;
};

// A continuation: what must match after the current node, given the position reached.
class Cont {
 public:
  template <class F>
  Cont(const F& f) : obj_(&f), fn_([](const void* o, size_t p) { return (*static_cast<const F*>(o))(p); }) {}
  bool operator()(size_t p) const { return fn_(obj_, p); }

 private:
  const void* obj_;
  bool (*fn_)(const void*, size_t);
};

class Matcher {
 public:
  Matcher(const TextRegex::Program& prog, const std::string& pattern, const std::vector<char32_t>& text)
      : nodes_(prog.nodes), pattern_(pattern), t_(text) {}

  // Matches at start; returns the end or -1.
  long long at(int root, size_t start) {
    steps_ = 0;
    long long end = -1;
    const auto accept = [&](size_t p) {
      end = static_cast<long long>(p);
      return true;
    };
    seq(nodes_[size_t(root)].self, 0, start, Cont(accept));
    return end;
  }

 private:
  struct Depth {
    int& d;
    explicit Depth(int& x) : d(x) { ++d; }
    ~Depth() { --d; }
  };

  void budget(size_t pos) {
    // Per attempt, as Oniguruma counts; and over the whole text, so a pattern that fails slowly
    // at every start cannot take quadratic time.
    if (++total_ > kStepLimit + kStepsPerChar * t_.size())
      throw Error(detail::cat("tokenizer: regex /", pattern_, "/ takes more than ", kStepLimit, " + ",
                              kStepsPerChar, " steps per character on a text of ", t_.size(), " characters"));
    if (++steps_ > kStepLimit)
      throw Error(detail::cat("tokenizer: regex /", pattern_, "/ backtracks more than ", kStepLimit,
                              " steps at character ", pos, " of the text (catastrophic backtracking)"));
  }

  bool seq(const std::vector<int>& s, size_t i, size_t pos, Cont k) {
    budget(pos);
    // Runs of single characters need no recursion.
    for (; i < s.size() && nodes_[size_t(s[i])].kind == Node::Set; ++i, ++pos)
      if (pos >= t_.size() || !nodes_[size_t(s[i])].test(t_[pos])) return false;
    if (i == s.size()) return k(pos);
    Depth guard(depth_);
    if (depth_ > kDepthLimit)
      throw Error(detail::cat("tokenizer: regex /", pattern_, "/ nests more than ", kDepthLimit,
                              " steps deep at character ", pos, " of the text"));
    const Node& n = nodes_[size_t(s[i])];
    const auto rest = [&](size_t p) { return seq(s, i + 1, p, k); };
    switch (n.kind) {
      case Node::Group:
        for (const auto& alt : n.alts)
          if (seq(alt, 0, pos, Cont(rest))) return true;
        return false;
      case Node::Look: {
        bool found = false;
        const auto yes = [](size_t) { return true; };
        for (const auto& alt : n.alts)
          if (seq(alt, 0, pos, Cont(yes))) {
            found = true;
            break;
          }
        return found != n.look_negated && rest(pos);
      }
      case Node::Repeat: {
        const Node& c = nodes_[size_t(n.child)];
        if (c.kind == Node::Set) {  // a run of one class: count it, then give back one at a time
          size_t most = 0;
          const size_t cap = n.max < 0 ? t_.size() - pos : std::min(t_.size() - pos, size_t(n.max));
          while (most < cap && c.test(t_[pos + most])) ++most;
          if (most < size_t(n.min)) return false;
          if (n.greedy) {
            for (size_t j = most + 1; j-- > size_t(n.min);) {
              budget(pos);
              if (rest(pos + j)) return true;
            }
          } else {
            for (size_t j = size_t(n.min); j <= most; ++j) {
              budget(pos);
              if (rest(pos + j)) return true;
            }
          }
          return false;
        }
        return repeat(n, 0, pos, Cont(rest));
      }
      case Node::Anchor: {
        const size_t end = t_.size();
        bool ok = false;
        switch (n.anchor) {
          case Node::LineStart: ok = pos == 0 || t_[pos - 1] == '\n'; break;
          case Node::LineEnd: ok = pos == end || t_[pos] == '\n'; break;
          case Node::TextStart: ok = pos == 0; break;
          case Node::TextEnd: ok = pos == end; break;
          case Node::TextEndOrNewline: ok = pos == end || (pos + 1 == end && t_[pos] == '\n'); break;
        }
        return ok && rest(pos);
      }
      default:
        return false;
    }
  }

  // count iterations done, ending at pos. An iteration that consumes nothing ends the loop
  // (once min is reached), as Oniguruma's empty-loop check does.
  bool repeat(const Node& n, int count, size_t pos, Cont rest) {
    const Node& c = nodes_[size_t(n.child)];
    const auto again = [&](size_t q) {
      if (q == pos && count + 1 >= n.min) return rest(q);
      return repeat(n, count + 1, q, rest);
    };
    const bool more = n.max < 0 || count < n.max;
    if (n.greedy) {
      if (more && seq(c.self, 0, pos, Cont(again))) return true;
      return count >= n.min && rest(pos);
    }
    if (count >= n.min && rest(pos)) return true;
    return more && seq(c.self, 0, pos, Cont(again));
  }

  const std::vector<Node>& nodes_;
  const std::string& pattern_;
  const std::vector<char32_t>& t_;
  uint64_t steps_ = 0, total_ = 0;
  int depth_ = 0;
};

}  // namespace

TextRegex::TextRegex(std::string_view pattern) : pattern_(pattern), prog_(std::make_unique<Program>()) {
  Parser parser(pattern_, *prog_);
  prog_->root = parser.parse();
}

TextRegex::~TextRegex() = default;
TextRegex::TextRegex(TextRegex&&) noexcept = default;
TextRegex& TextRegex::operator=(TextRegex&&) noexcept = default;

std::vector<std::pair<size_t, size_t>> TextRegex::find_all(const std::vector<char32_t>& text) const {
  std::vector<std::pair<size_t, size_t>> out;
  Matcher m(*prog_, pattern_, text);
  size_t from = 0;
  while (from <= text.size()) {
    bool found = false;
    for (size_t s = from; s <= text.size(); ++s) {
      const long long e = m.at(prog_->root, s);
      if (e < 0) continue;
      out.emplace_back(s, size_t(e));
      from = size_t(e) > s ? size_t(e) : s + 1;
      found = true;
      break;
    }
    if (!found) break;
  }
  return out;
}

}  // namespace hm
