// A Jinja interpreter for Hugging Face chat templates (chat_template.h). The lexer follows
// jinja2 3.1's (newline normalisation, one trailing newline dropped, trim_blocks, lstrip_blocks,
// - and + whitespace control, brace balancing inside tags); the parser follows jinja2's grammar
// and precedence; values follow Python's semantics (str(), repr(), ==, truthiness, slicing by
// code point) and json.dumps for transformers' tojson.
//
// Filters: abs, capitalize, count, d, default, dictsort, e, escape, first, float, indent, int,
//   items, join, last, length, list, lower, map, max, min, reject, rejectattr, replace, reverse,
//   round, safe, select, selectattr, sort, string, sum, title, tojson, trim, unique, upper.
// Tests: boolean, callable, defined, divisibleby, eq, equalto, even, false, float, ge, gt,
//   greaterthan, in, integer, iterable, le, lessthan, lower, lt, mapping, ne, none, number, odd,
//   sameas, sequence, string, true, undefined, upper, ==, !=, <, <=, >, >=.
// Globals: range, dict, namespace, raise_exception, strftime_now.
// Methods: str: strip lstrip rstrip split rsplit splitlines startswith endswith upper lower
//   title capitalize replace find count join isdigit isspace isalpha isalnum isupper islower;
//   dict: items keys values get.
#include "runtime/chat_template.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cerrno>
#include <optional>
#include <filesystem>
#include <set>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/json_read.h"

namespace hm {

namespace {

using ojson = nlohmann::ordered_json;

[[noreturn]] void fail(int line, const std::string& msg) {
  throw Error(detail::cat("chat template line ", line, ": ", msg));
}

// ---------------------------------------------------------------- UTF-8 and Python strings

// Decodes UTF-8; a byte that starts no valid sequence becomes U+DC00+byte (Python's
// surrogateescape), so encoding gives the same bytes back.
std::u32string to_u32(std::string_view s) {
  std::u32string r;
  r.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    char32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = len > 0 && i + size_t(len) <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const auto d = static_cast<unsigned char>(s[i + size_t(k)]);
      if ((d & 0xC0) != 0x80) ok = false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if (ok && ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
               (cp >= 0xD800 && cp <= 0xDFFF)))
      ok = false;
    if (!ok) {
      r.push_back(char32_t(0xDC00 + c));
      ++i;
    } else {
      r.push_back(cp);
      i += size_t(len);
    }
  }
  return r;
}

void put_u8(std::string& out, char32_t cp) {
  if (cp >= 0xDC80 && cp <= 0xDCFF) {
    out.push_back(char(cp - 0xDC00));
  } else if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

std::string to_u8(std::u32string_view s) {
  std::string r;
  r.reserve(s.size());
  for (char32_t c : s) put_u8(r, c);
  return r;
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

size_t u8_length(std::string_view s) {
  size_t n = 0;
  for (char c : s)
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) ++n;
  return is_ascii(s) ? s.size() : to_u32(s).size();
}

// str.isspace() / the regex \s.
bool py_space(char32_t c) {
  return (c >= 9 && c <= 13) || (c >= 28 && c <= 32) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Python's str.strip family; chars == nullptr: whitespace.
std::string py_strip(std::string_view s, const std::u32string* chars, bool left, bool right) {
  const std::u32string u = to_u32(s);
  auto drop = [&](char32_t c) { return chars ? chars->find(c) != std::u32string::npos : py_space(c); };
  size_t a = 0, b = u.size();
  if (left)
    while (a < b && drop(u[a])) ++a;
  if (right)
    while (b > a && drop(u[b - 1])) --b;
  return to_u8(std::u32string_view(u).substr(a, b - a));
}

bool ascii_alpha(char32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Simple case mapping of Python's str.upper/lower for ASCII, Latin-1, Latin Extended-A, Greek and
// Cyrillic (other scripts are left as they are).
char32_t uc_upper(char32_t c) {
  if (c < 0x80) return c >= 'a' && c <= 'z' ? c - 32 : c;
  if (c == 0xB5) return 0x39C;
  if (c >= 0xE0 && c <= 0xFE && c != 0xF7) return c - 32;
  if (c == 0xFF) return 0x178;
  if (c >= 0x100 && c <= 0x17F) {
    if (c == 0x131) return 'I';
    if (c == 0x17F) return 'S';
    const bool odd_lower = (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E);
    if (c == 0x138 || c == 0x149 || c == 0x130 || c == 0x178) return c;
    if (odd_lower) return (c & 1) ? c : c - 1;
    return (c & 1) ? c - 1 : c;
  }
  if (c >= 0x3B1 && c <= 0x3CB && c != 0x3C2) return c - 32;
  if (c == 0x3C2) return 0x3A3;
  if (c == 0x3CC) return 0x38C;
  if (c == 0x3CD || c == 0x3CE) return c - 63;
  if (c >= 0x3AC && c <= 0x3AF) return c == 0x3AC ? 0x386 : c - 37;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}
char32_t uc_lower(char32_t c) {
  if (c < 0x80) return c >= 'A' && c <= 'Z' ? c + 32 : c;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c == 0x178) return 0xFF;
  if (c >= 0x100 && c <= 0x17F) {
    if (c == 0x130) return 'i';
    const bool odd_lower = (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E);
    if (c == 0x138 || c == 0x149 || c == 0x131 || c == 0x17F) return c;
    if (odd_lower) return (c & 1) ? c + 1 : c;
    return (c & 1) ? c : c + 1;
  }
  if (c >= 0x391 && c <= 0x3AB && c != 0x3A2) return c + 32;
  if (c == 0x386) return 0x3AC;
  if (c == 0x38C) return 0x3CC;
  if (c == 0x38E || c == 0x38F) return c + 63;
  if (c >= 0x388 && c <= 0x38A) return c + 37;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}
bool uc_is_lower(char32_t c) { return uc_upper(c) != c || c == 0xDF || c == 0x138 || c == 0x149; }
bool uc_is_upper(char32_t c) { return uc_lower(c) != c; }

// str.lower() of u[k] in its string: a capital sigma that ends a word becomes final sigma.
char32_t lower_at(std::u32string_view u, size_t k) {
  if (u[k] != 0x3A3) return uc_lower(u[k]);
  const bool after_cased = k > 0 && (uc_is_lower(u[k - 1]) || uc_is_upper(u[k - 1]));
  const bool before_cased = k + 1 < u.size() && (uc_is_lower(u[k + 1]) || uc_is_upper(u[k + 1]));
  return after_cased && !before_cased ? 0x3C2 : 0x3C3;
}

std::u32string lower_u32(std::u32string_view u) {
  std::u32string r(u);
  for (size_t k = 0; k < u.size(); ++k) r[k] = lower_at(u, k);
  return r;
}

std::string map_case(std::string_view s, bool up) {
  if (is_ascii(s)) {
    std::string r(s);
    for (char& c : r) c = char(up ? uc_upper(static_cast<unsigned char>(c)) : uc_lower(static_cast<unsigned char>(c)));
    return r;
  }
  const std::u32string u = to_u32(s);
  if (!up) return to_u8(lower_u32(u));
  std::string r;
  for (char32_t c : u) {
    if (c == 0xDF) r += "SS";
    else put_u8(r, uc_upper(c));
  }
  return r;
}

// str.capitalize(): the first character upper (title) case, the rest lower.
std::string py_capitalize(std::string_view s) {
  std::u32string u = to_u32(s);
  if (u.empty()) return "";
  std::u32string r = lower_u32(u);
  r[0] = uc_upper(u[0]);
  return to_u8(r);
}

// float.__repr__: the shortest digits that read back, fixed notation for exponents in [-4, 16).
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[40];
  for (int p = 1; p <= 17; ++p) {
    std::snprintf(buf, sizeof buf, "%.*e", p - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string m(buf);
  const size_t e = m.find('e');
  const int exp10 = std::atoi(m.c_str() + e + 1);
  std::string digits;
  bool neg = false;
  for (size_t k = 0; k < e; ++k) {
    if (m[k] == '-') neg = true;
    else if (m[k] != '.') digits.push_back(m[k]);
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string r = neg ? "-" : "";
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 < 0) {
      r += "0." + std::string(size_t(-exp10 - 1), '0') + digits;
    } else if (size_t(exp10) + 1 >= digits.size()) {
      r += digits + std::string(size_t(exp10) + 1 - digits.size(), '0') + ".0";
    } else {
      r += digits.substr(0, size_t(exp10) + 1) + "." + digits.substr(size_t(exp10) + 1);
    }
  } else {
    r += digits.substr(0, 1);
    if (digits.size() > 1) r += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    r += eb;
  }
  return r;
}

// json.dumps of a string.
void json_string(std::string& out, std::string_view s, bool ensure_ascii) {
  out.push_back('"');
  auto hex4 = [&](unsigned v) {
    char b[16];
    std::snprintf(b, sizeof b, "\\u%04x", v);
    out += b;
  };
  const std::u32string u = ensure_ascii ? to_u32(s) : std::u32string();
  auto one = [&](char32_t c) {
    switch (c) {
      case '"': out += "\\\""; return;
      case '\\': out += "\\\\"; return;
      case '\n': out += "\\n"; return;
      case '\r': out += "\\r"; return;
      case '\t': out += "\\t"; return;
      case '\b': out += "\\b"; return;
      case '\f': out += "\\f"; return;
      default: break;
    }
    if (c < 0x20) return hex4(unsigned(c));
    if (!ensure_ascii || c < 0x7F) return put_u8(out, c);
    if (c < 0x10000) return hex4(unsigned(c));
    const char32_t v = c - 0x10000;
    hex4(unsigned(0xD800 + (v >> 10)));
    hex4(unsigned(0xDC00 + (v & 0x3FF)));
  };
  if (ensure_ascii) {
    for (char32_t c : u) one(c);
  } else {
    for (size_t i = 0; i < s.size(); ++i) {
      const auto c = static_cast<unsigned char>(s[i]);
      if (c >= 0x80) out.push_back(char(c));
      else one(c);
    }
  }
  out.push_back('"');
}

// repr() of a str.
std::string py_repr_str(std::string_view s) {
  const bool dq = s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos;
  const char q = dq ? '"' : '\'';
  std::string r(1, q);
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\\') r += "\\\\";
    else if (c == static_cast<unsigned char>(q)) (r += '\\') += ch;
    else if (c == '\n') r += "\\n";
    else if (c == '\r') r += "\\r";
    else if (c == '\t') r += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      r += b;
    } else {
      r.push_back(ch);
    }
  }
  r.push_back(q);
  return r;
}

std::string html_escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    switch (c) {
      case '&': r += "&amp;"; break;
      case '<': r += "&lt;"; break;
      case '>': r += "&gt;"; break;
      case '"': r += "&#34;"; break;
      case '\'': r += "&#39;"; break;
      default: r.push_back(c);
    }
  }
  return r;
}

// ---------------------------------------------------------------- values

struct Value;
struct Renderer;
struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};
struct Func;
struct DictT;

struct Value {
  enum T : uint8_t { Undef, None, Bool, Int, Float, Str, List, Dict, Fn };
  T t = Undef;
  bool tuple = false;  // a List made by a tuple literal or items(): repr (a, b)
  bool markup = false;  // a Str marked safe (| safe, | e): + escapes a plain str joined to it
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // Str; Undef: why it is undefined ("'x' is undefined")
  std::shared_ptr<std::vector<Value>> l;
  std::shared_ptr<DictT> d;
  std::shared_ptr<Func> fn;

  static Value undef(std::string why) {
    Value v;
    v.s = std::move(why);
    return v;
  }
  static Value none() {
    Value v;
    v.t = None;
    return v;
  }
  static Value boolean(bool x) {
    Value v;
    v.t = Bool;
    v.b = x;
    return v;
  }
  static Value integer(int64_t x) {
    Value v;
    v.t = Int;
    v.i = x;
    return v;
  }
  static Value flt(double x) {
    Value v;
    v.t = Float;
    v.f = x;
    return v;
  }
  static Value str(std::string x) {
    Value v;
    v.t = Str;
    v.s = std::move(x);
    return v;
  }
  static Value list(std::vector<Value> x, bool is_tuple = false);
  static Value dict(bool ns = false);
  bool is_num() const { return t == Int || t == Float || t == Bool; }
  bool is_intlike() const { return t == Int || t == Bool; }
  int64_t as_int() const { return t == Bool ? int64_t(b) : i; }
  double as_double() const { return t == Float ? f : double(as_int()); }
};

struct DictT {
  std::vector<std::pair<std::string, Value>> kv;
  bool ns = false;  // a namespace(): attributes can be assigned
  const Value* get(std::string_view k) const {
    for (const auto& p : kv)
      if (p.first == k) return &p.second;
    return nullptr;
  }
  void put(const std::string& k, Value v) {
    for (auto& p : kv)
      if (p.first == k) {
        p.second = std::move(v);
        return;
      }
    kv.emplace_back(k, std::move(v));
  }
};

struct Func {
  std::string name;
  std::function<Value(Renderer&, Args&, int)> call;
};

// Lists and dicts are freed through a worklist, not recursively: a value nested 100,000 deep
// (a namespace that wrapped itself in a loop) must not overflow the stack when it goes.
template <class T>
struct IterativeDelete {
  void operator()(T* p) const {
    thread_local std::vector<std::function<void()>> pending;
    thread_local bool draining = false;
    pending.emplace_back([p] { delete p; });
    if (draining) return;
    draining = true;
    while (!pending.empty()) {
      auto f = std::move(pending.back());
      pending.pop_back();
      f();  // frees p's elements; those whose count drops to 0 land in pending, not on the stack
    }
    draining = false;
  }
};

Value Value::list(std::vector<Value> x, bool is_tuple) {
  Value v;
  v.t = List;
  v.tuple = is_tuple;
  v.l = std::shared_ptr<std::vector<Value>>(new std::vector<Value>(std::move(x)), IterativeDelete<std::vector<Value>>());
  return v;
}

Value Value::dict(bool ns) {
  Value v;
  v.t = Dict;
  v.d = std::shared_ptr<DictT>(new DictT(), IterativeDelete<DictT>());
  v.d->ns = ns;
  return v;
}

Value make_func(std::string name, std::function<Value(Renderer&, Args&, int)> f) {
  Value v;
  v.t = Value::Fn;
  v.fn = std::make_shared<Func>(Func{std::move(name), std::move(f)});
  return v;
}

const char* type_name(const Value& v) {
  switch (v.t) {
    case Value::Undef: return "Undefined";
    case Value::None: return "NoneType";
    case Value::Bool: return "bool";
    case Value::Int: return "int";
    case Value::Float: return "float";
    case Value::Str: return "str";
    case Value::List: return v.tuple ? "tuple" : "list";
    case Value::Dict: return v.d->ns ? "Namespace" : "dict";
    case Value::Fn: return "function";
  }
  return "?";
}

template <class J>
Value from_json(const J& j, int depth) {
  if (depth > 256) throw Error("chat template: the variables nest deeper than 256 levels");
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value::boolean(j.template get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::integer(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      const uint64_t u = j.template get<uint64_t>();
      if (u > uint64_t(INT64_MAX)) return Value::flt(double(u));
      return Value::integer(int64_t(u));
    }
    case nlohmann::json::value_t::number_float: return Value::flt(j.template get<double>());
    case nlohmann::json::value_t::string: return Value::str(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      std::vector<Value> v;
      v.reserve(j.size());
      for (const auto& x : j) v.push_back(from_json(x, depth + 1));
      return Value::list(std::move(v));
    }
    case nlohmann::json::value_t::object: {
      Value v = Value::dict();
      for (auto it = j.begin(); it != j.end(); ++it) v.d->kv.emplace_back(it.key(), from_json(it.value(), depth + 1));
      return v;
    }
    default: return Value::none();
  }
}

// ---------------------------------------------------------------- lexer

enum class TK { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, Str, Int, Float, Op, Eof };

struct Tok {
  TK k;
  std::string s;  // Data text, Name, Str value, Op
  int64_t i = 0;
  double f = 0;
  int line = 1;
};

std::string describe(const Tok& t) {
  switch (t.k) {
    case TK::Data: return "template data";
    case TK::VarBegin: return "'{{'";
    case TK::VarEnd: return "end of print statement '}}'";
    case TK::BlockBegin: return "'{%'";
    case TK::BlockEnd: return "end of statement block '%}'";
    case TK::Name: return "'" + t.s + "'";
    case TK::Str: return "string " + py_repr_str(t.s);
    case TK::Int: return "integer " + std::to_string(t.i);
    case TK::Float: return "float " + py_float(t.f);
    case TK::Op: return "'" + t.s + "'";
    case TK::Eof: return "end of template";
  }
  return "?";
}

bool name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool name_char(char c) { return name_start(c) || (c >= '0' && c <= '9'); }
bool digit(char c) { return c >= '0' && c <= '9'; }

class Lexer {
 public:
  explicit Lexer(const std::string& source) {
    // jinja2: \r\n and \r become \n; one trailing newline goes (keep_trailing_newline=False).
    src_.reserve(source.size());
    for (size_t k = 0; k < source.size(); ++k) {
      if (source[k] == '\r') {
        src_.push_back('\n');
        if (k + 1 < source.size() && source[k + 1] == '\n') ++k;
      } else {
        src_.push_back(source[k]);
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Tok> run() {
    const size_t n = src_.size();
    while (pos_ < n) {
      size_t t = pos_;
      for (;; ++t) {
        t = src_.find('{', t);
        if (t == std::string::npos || t + 1 >= n) {
          t = std::string::npos;
          break;
        }
        const char c = src_[t + 1];
        if (c == '{' || c == '%' || c == '#') break;
      }
      if (t == std::string::npos) {
        data(src_.substr(pos_), line_);
        count_lines(pos_, n);
        pos_ = n;
        break;
      }
      const char kind = src_[t + 1];
      size_t after = t + 2;
      const char sign = after < n && (src_[after] == '-' || src_[after] == '+') ? src_[after] : 0;
      std::string text = src_.substr(pos_, t - pos_);
      const int text_line = line_;
      count_lines(pos_, t);
      if (sign) ++after;
      if (kind == '%' && raw_block(t, after, text, text_line, sign)) continue;
      if (sign == '-') text = py_strip(text, nullptr, false, true);
      else if (sign != '+' && kind != '{') text = lstrip(text);
      data(std::move(text), text_line);
      pos_ = after;
      if (kind == '#') comment();
      else tag(kind == '{');
    }
    out_.push_back(Tok{TK::Eof, "", 0, 0, line_});
    return std::move(out_);
  }

 private:
  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Tok> out_;

  void count_lines(size_t a, size_t b) {
    for (size_t k = a; k < b; ++k)
      if (src_[k] == '\n') ++line_;
  }
  void data(std::string text, int at_line) {
    if (!text.empty()) out_.push_back(Tok{TK::Data, std::move(text), 0, 0, at_line});
  }
  // lstrip_blocks: whitespace between the line's start and a block or comment tag goes.
  std::string lstrip(std::string text) const {
    const size_t nl = text.rfind('\n');
    const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
    if (l_pos == 0 && !line_starting_) return text;
    if (l_pos == text.size()) return text;
    for (size_t k = l_pos; k < text.size(); ++k)
      if (!py_space(static_cast<unsigned char>(text[k]))) return text;
    return text.substr(0, l_pos);
  }
  size_t skip_ws(size_t p) const {
    while (p < src_.size() && py_space(static_cast<unsigned char>(src_[p]))) ++p;
    return p;
  }
  bool at(size_t p, std::string_view s) const { return src_.compare(p, s.size(), s) == 0; }
  // The end of a block tag at p (after optional whitespace): its end position, or npos.
  // trim: %} takes one newline after it.
  size_t block_end(size_t p, bool trim) const {
    p = skip_ws(p);
    if (at(p, "+%}")) return p + 3;
    if (at(p, "-%}")) return skip_ws(p + 3);
    if (at(p, "%}")) return p + 2 + (trim && p + 2 < src_.size() && src_[p + 2] == '\n' ? 1 : 0);
    return std::string::npos;
  }
  bool word_at(size_t p, std::string_view w) const {
    return at(p, w) && (p + w.size() >= src_.size() || !name_char(src_[p + w.size()]));
  }

  // {% raw %}...{% endraw %}: the text between, untouched.
  bool raw_block(size_t t, size_t after, std::string& text, int text_line, char sign) {
    size_t p = skip_ws(after);
    if (!word_at(p, "raw")) return false;
    p = skip_ws(p + 3);
    size_t body;
    if (at(p, "-%}")) body = skip_ws(p + 3);
    else if (at(p, "%}")) body = p + 2;
    else return false;
    if (sign == '-') text = py_strip(text, nullptr, false, true);
    else if (sign != '+') text = lstrip(text);
    data(std::move(text), text_line);
    count_lines(t, body);
    line_starting_ = src_[body - 1] == '\n';
    for (size_t q = src_.find("{%", body); q != std::string::npos; q = src_.find("{%", q + 1)) {
      size_t r = q + 2;
      const char esign = r < src_.size() && (src_[r] == '-' || src_[r] == '+') ? src_[r] : 0;
      if (esign) ++r;
      r = skip_ws(r);
      if (!word_at(r, "endraw")) continue;
      const size_t end = block_end(r + 6, true);
      if (end == std::string::npos) continue;
      std::string content = src_.substr(body, q - body);
      if (esign == '-') content = py_strip(content, nullptr, false, true);
      else if (esign != '+') content = lstrip(content);
      data(std::move(content), line_);
      count_lines(body, end);
      line_starting_ = src_[end - 1] == '\n';
      pos_ = end;
      return true;
    }
    fail(text_line, "missing end of raw directive");
  }

  void comment() {
    const int start = line_;
    size_t j = src_.find("#}", pos_);
    if (j == std::string::npos) fail(start, "missing end of comment tag");
    size_t end;
    if (j > pos_ && src_[j - 1] == '-') end = skip_ws(j + 2);
    else if (j > pos_ && src_[j - 1] == '+') end = j + 2;
    else end = j + 2 + (j + 2 < src_.size() && src_[j + 2] == '\n' ? 1 : 0);
    count_lines(pos_, end);
    line_starting_ = src_[end - 1] == '\n';
    pos_ = end;
  }

  void tag(bool var) {
    const int start = line_;
    out_.push_back(Tok{var ? TK::VarBegin : TK::BlockBegin, "", 0, 0, line_});
    std::string stack;
    const size_t n = src_.size();
    for (;;) {
      if (pos_ >= n) fail(start, var ? "unexpected end of template: '{{' is not closed by '}}'"
                                     : "unexpected end of template: '{%' is not closed by '%}'");
      if (stack.empty()) {
        size_t end = std::string::npos;
        if (var) {
          if (at(pos_, "-}}")) end = skip_ws(pos_ + 3);
          else if (at(pos_, "}}")) end = pos_ + 2;
        } else if (at(pos_, "+%}") || at(pos_, "-%}") || at(pos_, "%}")) {
          end = block_end(pos_, true);
        }
        if (end != std::string::npos) {
          out_.push_back(Tok{var ? TK::VarEnd : TK::BlockEnd, "", 0, 0, line_});
          count_lines(pos_, end);
          line_starting_ = src_[end - 1] == '\n';
          pos_ = end;
          return;
        }
      }
      const char c = src_[pos_];
      if (py_space(static_cast<unsigned char>(c))) {
        if (c == '\n') ++line_;
        ++pos_;
      } else if (digit(c)) {
        number();
      } else if (name_start(c)) {
        size_t e = pos_;
        while (e < n && name_char(src_[e])) ++e;
        out_.push_back(Tok{TK::Name, src_.substr(pos_, e - pos_), 0, 0, line_});
        pos_ = e;
      } else if (c == '\'' || c == '"') {
        string_literal(c);
      } else {
        static const char* two[] = {"//", "**", "==", "!=", ">=", "<="};
        std::string op;
        for (const char* o : two)
          if (at(pos_, o)) op = o;
        if (op.empty()) {
          if (!std::strchr("+-/*%~[](){}|.,:;=<>", c) || c == 0)
            fail(line_, detail::cat("unexpected char ", py_repr_str(std::string(1, c)), " in a tag"));
          op = std::string(1, c);
        }
        if (op == "(" || op == "[" || op == "{") {
          stack.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
          if (stack.size() > 256) fail(line_, "brackets nest deeper than 256 levels");
        } else if (op == ")" || op == "]" || op == "}") {
          if (stack.empty()) fail(line_, "unexpected '" + op + "'");
          if (stack.back() != op[0])
            fail(line_, detail::cat("unexpected '", op, "', expected '", stack.back(), "'"));
          stack.pop_back();
        }
        out_.push_back(Tok{TK::Op, op, 0, 0, line_});
        pos_ += op.size();
      }
    }
  }

  size_t digits_at(size_t p) const {  // (\d+_)*\d+
    size_t e = p;
    while (e < src_.size() && (digit(src_[e]) || (src_[e] == '_' && e + 1 < src_.size() && digit(src_[e + 1])))) ++e;
    return e;
  }
  void number() {
    size_t e = digits_at(pos_);
    bool is_float = false;
    if (e + 1 < src_.size() && src_[e] == '.' && digit(src_[e + 1])) {
      e = digits_at(e + 1);
      is_float = true;
    }
    if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
      size_t x = e + 1;
      if (x < src_.size() && (src_[x] == '+' || src_[x] == '-')) ++x;
      if (x < src_.size() && digit(src_[x])) {
        e = digits_at(x);
        is_float = true;
      }
    }
    std::string txt;
    for (size_t k = pos_; k < e; ++k)
      if (src_[k] != '_') txt.push_back(src_[k]);
    Tok t{is_float ? TK::Float : TK::Int, txt, 0, 0, line_};
    if (is_float) {
      t.f = std::strtod(txt.c_str(), nullptr);
    } else {
      errno = 0;
      const unsigned long long v = std::strtoull(txt.c_str(), nullptr, 10);
      if (errno != 0 || v > uint64_t(INT64_MAX)) fail(line_, "integer literal " + txt + " is out of range");
      t.i = int64_t(v);
    }
    out_.push_back(std::move(t));
    pos_ = e;
  }
  // Python's unicode-escape decoding of the literal's text.
  void string_literal(char q) {
    const int start = line_;
    std::string v;
    size_t p = pos_ + 1;
    const size_t n = src_.size();
    for (;;) {
      if (p >= n) fail(start, "unterminated string literal");
      const char c = src_[p];
      if (c == q) break;
      if (c == '\n') ++line_;
      if (c != '\\') {
        v.push_back(c);
        ++p;
        continue;
      }
      if (p + 1 >= n) fail(start, "unterminated string literal");
      const char e = src_[p + 1];
      p += 2;
      auto hex = [&](int count) {
        if (p + size_t(count) > n) fail(line_, "truncated \\x, \\u or \\U escape in a string literal");
        char32_t cp = 0;
        for (int k = 0; k < count; ++k) {
          const char h = src_[p + size_t(k)];
          int d = digit(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
          if (d < 0) fail(line_, "truncated \\x, \\u or \\U escape in a string literal");
          cp = cp * 16 + char32_t(d);
        }
        p += size_t(count);
        if (cp > 0x10FFFF) fail(line_, "a \\U escape beyond U+10FFFF in a string literal");
        put_u8(v, cp);
      };
      switch (e) {
        case '\n': ++line_; break;
        case '\\': v.push_back('\\'); break;
        case '\'': v.push_back('\''); break;
        case '"': v.push_back('"'); break;
        case 'a': v.push_back('\a'); break;
        case 'b': v.push_back('\b'); break;
        case 'f': v.push_back('\f'); break;
        case 'n': v.push_back('\n'); break;
        case 'r': v.push_back('\r'); break;
        case 't': v.push_back('\t'); break;
        case 'v': v.push_back('\v'); break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        default:
          if (e >= '0' && e <= '7') {
            char32_t cp = char32_t(e - '0');
            for (int k = 0; k < 2 && p < n && src_[p] >= '0' && src_[p] <= '7'; ++k) cp = cp * 8 + char32_t(src_[p++] - '0');
            put_u8(v, cp);
          } else {
            v.push_back('\\');
            v.push_back(e);
          }
      }
    }
    out_.push_back(Tok{TK::Str, std::move(v), 0, 0, start});
    pos_ = p + 1;
  }
};

// ---------------------------------------------------------------- syntax tree

struct Expr;
using EP = std::unique_ptr<Expr>;
struct Expr {
  enum K { Lit, Name, Attr, Item, Slice, Call, Filter, Test, Neg, Pos, Bin, Cmp, And, Or, Not, Cond, ListLit, TupleLit,
           DictLit, Concat };
  K k;
  int line;
  Value lit;
  std::string name;               // Name, Attr, Filter, Test; Bin: the operator
  std::vector<EP> a;              // operands (Slice: object, start, stop, step, any null)
  std::vector<std::string> ops;   // Cmp: one per comparison
  std::vector<std::pair<std::string, EP>> kw;
  bool neg = false;               // Test: is not
  int depth = 1;                  // of the tree under it (the parser bounds it)
};

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;
struct Node {
  enum K { Text, Out, If, For, Set, SetBlock, Macro, Break, Continue, FilterBlock, Inline };
  K k;
  int line;
  std::string text;                 // Text; Macro: its name
  EP e;                             // Out; For: the iterable; Set: the value
  EP cond;                          // For: the `if` filter
  std::vector<std::string> names;   // For/Set targets; Set on an attribute: {namespace, attribute}
  bool attr = false;
  std::vector<std::pair<EP, Body>> branches;  // If (the else branch has a null condition)
  Body body, else_body;
  std::vector<std::pair<std::string, EP>> params;  // Macro
  std::vector<EP> filters;          // FilterBlock, SetBlock: Filter exprs on a null operand
};

const std::unordered_set<std::string>& known_filters() {
  static const std::unordered_set<std::string> f = {
      "abs", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float", "indent", "int",
      "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace",
      "reverse", "round", "safe", "select", "selectattr", "sort", "string", "sum", "title", "tojson", "trim",
      "unique", "upper"};
  return f;
}
const std::unordered_set<std::string>& known_tests() {
  static const std::unordered_set<std::string> t = {
      "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "even", "false", "float", "ge", "gt",
      "greaterthan", "in", "integer", "iterable", "le", "lessthan", "lower", "lt", "mapping", "ne", "none", "number",
      "odd", "sameas", "sequence", "string", "true", "undefined", "upper", "==", "!=", "<", "<=", ">", ">="};
  return t;
}

class Parser {
 public:
  Parser(std::vector<Tok> toks, int max_depth) : t_(std::move(toks)), max_depth_(max_depth) {}

  Body parse() {
    Body b = body({});
    return b;
  }

 private:
  std::vector<Tok> t_;
  size_t p_ = 0;
  int max_depth_;
  int depth_ = 0;
  int loops_ = 0;

  struct Deeper {
    Parser& ps;
    explicit Deeper(Parser& x, int line) : ps(x) {
      if (++ps.depth_ > ps.max_depth_)
        fail(line, detail::cat("the template nests deeper than ", ps.max_depth_, " levels"));
    }
    ~Deeper() { --ps.depth_; }
  };

  const Tok& cur() const { return t_[p_]; }
  const Tok& peek(size_t k = 1) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  void next() {
    if (p_ + 1 < t_.size()) ++p_;
  }
  bool is_op(const char* o) const { return cur().k == TK::Op && cur().s == o; }
  bool is_name(const char* nm) const { return cur().k == TK::Name && cur().s == nm; }
  [[noreturn]] void unexpected(const char* expected) const {
    fail(cur().line, detail::cat("unexpected ", describe(cur()), ", expected ", expected));
  }
  void expect_op(const char* o) {
    if (!is_op(o)) unexpected(detail::cat("'", o, "'").c_str());
    next();
  }
  void expect_block_end() {
    if (cur().k != TK::BlockEnd) unexpected("end of statement block '%}'");
    next();
  }
  std::string expect_name(const char* what) {
    if (cur().k != TK::Name) unexpected(what);
    std::string s = cur().s;
    next();
    return s;
  }

  // Parses nodes until {% NAME %} for a NAME in `ends`; leaves cur() at that NAME.
  Body body(std::initializer_list<const char*> ends, int open_line = 0, const char* open_tag = nullptr) {
    Deeper dd(*this, cur().line);
    Body b;
    for (;;) {
      const Tok& tk = cur();
      if (tk.k == TK::Eof) {
        if (ends.size() == 0) return b;
        std::string want;
        for (const char* e : ends) want += (want.empty() ? "'" : " or '") + std::string(e) + "'";
        fail(open_line, detail::cat("'", open_tag, "' is never closed: the template ended, expected ", want));
      }
      if (tk.k == TK::Data) {
        auto n = std::make_unique<Node>();
        n->k = Node::Text;
        n->line = tk.line;
        n->text = tk.s;
        b.push_back(std::move(n));
        next();
      } else if (tk.k == TK::VarBegin) {
        next();
        auto n = std::make_unique<Node>();
        n->k = Node::Out;
        n->line = tk.line;
        n->e = tuple(true);
        if (cur().k != TK::VarEnd) unexpected("end of print statement '}}'");
        next();
        b.push_back(std::move(n));
      } else if (tk.k == TK::BlockBegin) {
        next();
        if (cur().k == TK::Name)
          for (const char* e : ends)
            if (cur().s == e) return b;
        statement(b);
      } else {
        unexpected("template data or a tag");
      }
    }
  }

  void statement(Body& b) {
    const Tok& tk = cur();
    const int line = tk.line;
    if (tk.k != TK::Name) unexpected("a statement name");
    const std::string kw = tk.s;
    auto n = std::make_unique<Node>();
    n->line = line;
    if (kw == "if") {
      next();
      n->k = Node::If;
      EP c = expression(false);
      expect_block_end();
      for (;;) {
        Body br = body({"elif", "else", "endif"}, line, "if");
        n->branches.emplace_back(std::move(c), std::move(br));
        const std::string which = cur().s;
        next();
        if (which == "elif") {
          c = expression(false);
          expect_block_end();
        } else if (which == "else") {
          expect_block_end();
          n->else_body = body({"endif"}, line, "if");
          next();
          expect_block_end();
          break;
        } else {
          expect_block_end();
          break;
        }
      }
    } else if (kw == "for") {
      next();
      n->k = Node::For;
      n->names = targets();
      if (!is_name("in")) unexpected("'in'");
      next();
      n->e = tuple(false, "if");
      if (is_name("if")) {
        next();
        n->cond = expression(true);
      }
      if (is_name("recursive")) fail(cur().line, "recursive for loops are not supported");
      expect_block_end();
      ++loops_;
      n->body = body({"endfor", "else"}, line, "for");
      --loops_;
      if (cur().s == "else") {
        next();
        expect_block_end();
        n->else_body = body({"endfor"}, line, "for");
      }
      next();
      expect_block_end();
    } else if (kw == "set") {
      next();
      if (cur().k == TK::Name && peek().k == TK::Op && peek().s == ".") {
        n->names.push_back(cur().s);
        next();
        next();
        n->names.push_back(expect_name("an attribute name"));
        n->attr = true;
      } else {
        n->names = targets();
      }
      if (is_op("=")) {
        next();
        n->k = Node::Set;
        n->e = tuple(true);
        expect_block_end();
      } else {
        if (n->attr || n->names.size() != 1) unexpected("'='");
        n->k = Node::SetBlock;
        while (is_op("|")) n->filters.push_back(filter(nullptr));
        expect_block_end();
        n->body = body({"endset"}, line, "set");
        next();
        expect_block_end();
      }
    } else if (kw == "macro") {
      next();
      n->k = Node::Macro;
      n->text = expect_name("a macro name");
      expect_op("(");
      while (!is_op(")")) {
        if (!n->params.empty()) expect_op(",");
        if (is_op(")")) break;
        std::string pn = expect_name("a parameter name");
        EP def;
        if (is_op("=")) {
          next();
          def = expression(true);
        }
        n->params.emplace_back(std::move(pn), std::move(def));
      }
      next();
      expect_block_end();
      const int saved = loops_;
      loops_ = 0;
      n->body = body({"endmacro"}, line, "macro");
      loops_ = saved;
      next();
      if (cur().k == TK::Name) next();  // {% endmacro name %}
      expect_block_end();
    } else if (kw == "break" || kw == "continue") {
      if (loops_ == 0) fail(line, "'" + kw + "' outside of a for loop");
      next();
      n->k = kw == "break" ? Node::Break : Node::Continue;
      expect_block_end();
    } else if (kw == "filter") {
      next();
      n->k = Node::FilterBlock;
      n->filters.push_back(filter(nullptr, false));
      while (is_op("|")) n->filters.push_back(filter(nullptr));
      expect_block_end();
      n->body = body({"endfilter"}, line, "filter");
      next();
      expect_block_end();
    } else if (kw == "generation") {  // transformers' AssistantTracker: renders its body
      next();
      n->k = Node::Inline;
      expect_block_end();
      n->body = body({"endgeneration"}, line, "generation");
      next();
      expect_block_end();
    } else {
      fail(line, detail::cat("unknown or unsupported tag '", kw, "'"));
    }
    b.push_back(std::move(n));
  }

  std::vector<std::string> targets() {
    std::vector<std::string> names;
    const bool paren = is_op("(");
    if (paren) next();
    for (;;) {
      names.push_back(expect_name("a variable name"));
      if (!is_op(",")) break;
      next();
      if (cur().k != TK::Name) break;
    }
    if (paren) expect_op(")");
    for (const auto& nm : names)
      if (nm == "true" || nm == "false" || nm == "none" || nm == "True" || nm == "False" || nm == "None" ||
          nm == "loop")
        fail(cur().line, "cannot assign to '" + nm + "'");
    return names;
  }

  EP node(Expr::K k, int line) {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->line = line;
    return e;
  }
  // Sets n's depth from its operands: a chain such as 1 + 1 + ... is parsed in a loop, so this,
  // not the parser's own recursion, bounds how deep evaluating (and freeing) the tree recurses.
  EP settle(EP n) {
    int d = 0;
    for (const auto& c : n->a)
      if (c) d = std::max(d, c->depth);
    for (const auto& c : n->kw) d = std::max(d, c.second->depth);
    n->depth = d + 1;
    // max_depth, not more: under AddressSanitizer an eval frame takes over 16 KB, and 512 levels
    // overflowed the 8 MB stack (ChatTemplate.NestingStepsAndOutputAreBounded in CI).
    if (n->depth > max_depth_)
      fail(n->line, detail::cat("the expression nests deeper than ", max_depth_, " levels"));
    return n;
  }

  bool tuple_end(const char* extra) const {
    const Tok& tk = cur();
    if (tk.k == TK::VarEnd || tk.k == TK::BlockEnd || tk.k == TK::Eof) return true;
    if (tk.k == TK::Op && tk.s == ")") return true;
    return extra && tk.k == TK::Name && tk.s == extra;
  }

  // parse_tuple: one expression, or several with commas (a tuple).
  EP tuple(bool condexpr, const char* extra_end = nullptr, bool explicit_parens = false) {
    const int line = cur().line;
    std::vector<EP> items;
    bool is_tuple = false;
    for (;;) {
      if (!items.empty()) expect_op(",");
      if (tuple_end(extra_end)) break;
      items.push_back(expression(condexpr));
      if (is_op(",")) is_tuple = true;
      else break;
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) unexpected("an expression");
    }
    EP e = node(Expr::TupleLit, line);
    e->a = std::move(items);
    return settle(std::move(e));
  }

  EP expression(bool condexpr) { return condexpr ? cond_expr() : or_expr(); }

  EP cond_expr() {
    EP e = or_expr();
    while (is_name("if")) {
      const int line = cur().line;
      next();
      EP c = or_expr();
      EP other;
      if (is_name("else")) {
        next();
        other = cond_expr();
      }
      EP n = node(Expr::Cond, line);
      n->a.push_back(std::move(c));
      n->a.push_back(std::move(e));
      n->a.push_back(std::move(other));
      e = settle(std::move(n));
    }
    return e;
  }
  EP or_expr() {
    EP e = and_expr();
    while (is_name("or")) {
      EP n = node(Expr::Or, cur().line);
      next();
      n->a.push_back(std::move(e));
      n->a.push_back(and_expr());
      e = settle(std::move(n));
    }
    return e;
  }
  EP and_expr() {
    EP e = not_expr();
    while (is_name("and")) {
      EP n = node(Expr::And, cur().line);
      next();
      n->a.push_back(std::move(e));
      n->a.push_back(not_expr());
      e = settle(std::move(n));
    }
    return e;
  }
  EP not_expr() {
    if (is_name("not")) {
      Deeper dd(*this, cur().line);
      EP n = node(Expr::Not, cur().line);
      next();
      n->a.push_back(not_expr());
      return settle(std::move(n));
    }
    return compare();
  }
  EP compare() {
    const int line = cur().line;
    EP first = math1();
    EP n;
    for (;;) {
      std::string op;
      if (cur().k == TK::Op && (cur().s == "==" || cur().s == "!=" || cur().s == "<" || cur().s == ">" ||
                                cur().s == "<=" || cur().s == ">=")) {
        op = cur().s;
        next();
      } else if (is_name("in")) {
        op = "in";
        next();
      } else if (is_name("not") && peek().k == TK::Name && peek().s == "in") {
        op = "not in";
        next();
        next();
      } else {
        break;
      }
      if (!n) {
        n = node(Expr::Cmp, line);
        n->a.push_back(std::move(first));
      }
      n->ops.push_back(op);
      n->a.push_back(math1());
    }
    return n ? settle(std::move(n)) : std::move(first);
  }
  EP binary(EP left, const std::string& op, EP right, int line) {
    EP n = node(Expr::Bin, line);
    n->name = op;
    n->a.push_back(std::move(left));
    n->a.push_back(std::move(right));
    return settle(std::move(n));
  }
  EP math1() {
    EP e = concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = cur().s;
      const int line = cur().line;
      next();
      e = binary(std::move(e), op, concat(), line);
    }
    return e;
  }
  EP concat() {
    const int line = cur().line;
    EP e = math2();
    if (!is_op("~")) return e;
    EP n = node(Expr::Concat, line);
    n->a.push_back(std::move(e));
    while (is_op("~")) {
      next();
      n->a.push_back(math2());
    }
    return settle(std::move(n));
  }
  EP math2() {
    EP e = power();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = cur().s;
      const int line = cur().line;
      next();
      e = binary(std::move(e), op, power(), line);
    }
    return e;
  }
  EP power() {
    EP e = unary(true);
    while (is_op("**")) {
      const int line = cur().line;
      next();
      e = binary(std::move(e), "**", unary(true), line);
    }
    return e;
  }
  EP unary(bool with_filter) {
    Deeper dd(*this, cur().line);
    EP e;
    if (is_op("-") || is_op("+")) {
      e = node(is_op("-") ? Expr::Neg : Expr::Pos, cur().line);
      next();
      e->a.push_back(unary(false));
      e = settle(std::move(e));
    } else {
      e = primary();
    }
    e = postfix(std::move(e));
    if (with_filter) e = filter_expr(std::move(e));
    return e;
  }
  EP primary() {
    const Tok& tk = cur();
    const int line = tk.line;
    if (tk.k == TK::Name) {
      EP e = node(Expr::Lit, line);
      if (tk.s == "true" || tk.s == "True") e->lit = Value::boolean(true);
      else if (tk.s == "false" || tk.s == "False") e->lit = Value::boolean(false);
      else if (tk.s == "none" || tk.s == "None") e->lit = Value::none();
      else {
        e->k = Expr::Name;
        e->name = tk.s;
      }
      next();
      return e;
    }
    if (tk.k == TK::Str) {
      std::string s = tk.s;
      next();
      while (cur().k == TK::Str) {
        s += cur().s;
        next();
      }
      EP e = node(Expr::Lit, line);
      e->lit = Value::str(std::move(s));
      return e;
    }
    if (tk.k == TK::Int || tk.k == TK::Float) {
      EP e = node(Expr::Lit, line);
      e->lit = tk.k == TK::Int ? Value::integer(tk.i) : Value::flt(tk.f);
      next();
      return e;
    }
    if (is_op("(")) {
      next();
      EP e = tuple(true, nullptr, true);
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      next();
      EP e = node(Expr::ListLit, line);
      while (!is_op("]")) {
        if (!e->a.empty()) expect_op(",");
        if (is_op("]")) break;
        e->a.push_back(expression(true));
      }
      next();
      return settle(std::move(e));
    }
    if (is_op("{")) {
      next();
      EP e = node(Expr::DictLit, line);
      while (!is_op("}")) {
        if (!e->a.empty()) expect_op(",");
        if (is_op("}")) break;
        e->a.push_back(expression(true));
        expect_op(":");
        e->a.push_back(expression(true));
      }
      next();
      return settle(std::move(e));
    }
    unexpected("an expression");
  }
  EP postfix(EP e) {
    for (;;) {
      const int line = cur().line;
      if (is_op(".")) {
        next();
        if (cur().k == TK::Name) {
          EP n = node(Expr::Attr, line);
          n->name = cur().s;
          n->a.push_back(std::move(e));
          e = settle(std::move(n));
          next();
        } else if (cur().k == TK::Int) {
          EP n = node(Expr::Item, line);
          n->a.push_back(std::move(e));
          EP k = node(Expr::Lit, line);
          k->lit = Value::integer(cur().i);
          n->a.push_back(std::move(k));
          e = settle(std::move(n));
          next();
        } else {
          unexpected("an attribute name");
        }
      } else if (is_op("[")) {
        next();
        e = subscript(std::move(e), line);
        expect_op("]");
      } else if (is_op("(")) {
        e = call(std::move(e), line);
      } else {
        return e;
      }
    }
  }
  EP subscript(EP obj, int line) {
    EP start;
    if (!is_op(":")) {
      start = expression(true);
      if (!is_op(":")) {
        EP n = node(Expr::Item, line);
        n->a.push_back(std::move(obj));
        n->a.push_back(std::move(start));
        return settle(std::move(n));
      }
    }
    next();  // ':'
    EP stop, step;
    if (!is_op("]") && !is_op(":")) stop = expression(true);
    if (is_op(":")) {
      next();
      if (!is_op("]")) step = expression(true);
    }
    EP n = node(Expr::Slice, line);
    n->a.push_back(std::move(obj));
    n->a.push_back(std::move(start));
    n->a.push_back(std::move(stop));
    n->a.push_back(std::move(step));
    return settle(std::move(n));
  }
  // (args): positional and keyword arguments into e->a (after any operands) and e->kw.
  void call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (is_op(")")) break;
      if (is_op("*") || is_op("**")) fail(cur().line, "*args and **kwargs in calls are not supported");
      if (cur().k == TK::Name && peek().k == TK::Op && peek().s == "=") {
        std::string k = cur().s;
        next();
        next();
        e.kw.emplace_back(std::move(k), expression(true));
      } else {
        if (!e.kw.empty()) fail(cur().line, "a positional argument follows keyword arguments");
        e.a.push_back(expression(true));
      }
    }
    next();
  }
  EP call(EP callee, int line) {
    EP n = node(Expr::Call, line);
    n->a.push_back(std::move(callee));
    call_args(*n);
    return settle(std::move(n));
  }
  EP filter(EP operand, bool pipe = true) {
    if (pipe) expect_op("|");
    const int line = cur().line;
    EP n = node(Expr::Filter, line);
    n->name = expect_name("a filter name");
    if (!known_filters().count(n->name)) fail(line, "no filter named '" + n->name + "'");
    n->a.push_back(std::move(operand));
    if (is_op("(")) call_args(*n);
    return settle(std::move(n));
  }
  EP filter_expr(EP e) {
    for (;;) {
      if (is_op("|")) {
        e = filter(std::move(e));
      } else if (is_name("is")) {
        const int line = cur().line;
        next();
        EP n = node(Expr::Test, line);
        if (is_name("not")) {
          n->neg = true;
          next();
        }
        if (cur().k == TK::Name) n->name = cur().s;
        else if (cur().k == TK::Op && known_tests().count(cur().s)) n->name = cur().s;
        else unexpected("a test name");
        next();
        if (!known_tests().count(n->name)) fail(line, "no test named '" + n->name + "'");
        n->a.push_back(std::move(e));
        const Tok& tk = cur();
        if (is_op("(")) {
          call_args(*n);
        } else if ((tk.k == TK::Name || tk.k == TK::Str || tk.k == TK::Int || tk.k == TK::Float || is_op("[") ||
                    is_op("{")) &&
                   !(tk.k == TK::Name && (tk.s == "else" || tk.s == "or" || tk.s == "and"))) {
          if (is_name("is")) fail(tk.line, "you cannot chain multiple tests with is");
          n->a.push_back(postfix(primary()));
        }
        e = settle(std::move(n));
      } else if (is_op("(")) {
        e = call(std::move(e), cur().line);
      } else {
        return e;
      }
    }
  }
};

// ---------------------------------------------------------------- rendering

struct LoopBreak {};

struct Renderer {
  const ChatTemplateLimits& lim;
  const std::function<std::tm()>& clock;
  std::vector<std::vector<std::pair<std::string, Value>>> frames;
  uint64_t steps = 0;
  int macro_depth = 0;
  int frames_deep = 0;  // eval and exec calls under way: bounds the C++ stack whatever recurses
  // Every namespace made: emptied at the end, so that one holding itself is freed too.
  std::vector<std::shared_ptr<DictT>> namespaces;

  // At most 4 x max_depth (512 by default) eval and exec calls deep: under AddressSanitizer an
  // eval frame is several KB, and 2,048 of them overflowed the 8 MB stack in CI.
  int max_frames() const { return std::max(256, lim.max_depth * 4); }
  struct Frame {
    Renderer& r;
    Frame(Renderer& x, int line) : r(x) {
      if (++r.frames_deep > r.max_frames())
        fail(line, detail::cat("the template recurses deeper than ", r.max_frames(),
                               " evaluations (macros calling macros?)"));
    }
    ~Frame() { --r.frames_deep; }
  };

  Renderer(const ChatTemplateLimits& l, const std::function<std::tm()>& c) : lim(l), clock(c) {}
  ~Renderer() {
    for (auto& d : namespaces) d->kv.clear();
  }
  Renderer(const Renderer&) = delete;
  Renderer& operator=(const Renderer&) = delete;

  void step(int line, uint64_t n = 1) {
    steps += n;
    if (steps > lim.max_steps)
      fail(line, detail::cat("rendering took more than ", lim.max_steps, " steps (a runaway loop?)"));
  }
  void check_size(size_t n, int line) const {
    if (n > lim.max_output)
      fail(line, detail::cat("a string or list of ", n, " elements exceeds the limit of ", lim.max_output));
  }
  void emit(std::string& out, std::string_view s, int line) const {
    if (out.size() + s.size() > lim.max_output)
      fail(line, detail::cat("the output exceeds the limit of ", lim.max_output, " bytes"));
    out += s;
  }

  // -------- Python semantics

  [[noreturn]] void undefined_error(const Value& v, int line) const {
    fail(line, v.s.empty() ? std::string("undefined value") : v.s);
  }

  static bool truthy(const Value& v) {
    switch (v.t) {
      case Value::Undef: case Value::None: return false;
      case Value::Bool: return v.b;
      case Value::Int: return v.i != 0;
      case Value::Float: return v.f != 0;
      case Value::Str: return !v.s.empty();
      case Value::List: return !v.l->empty();
      case Value::Dict: return v.d->ns || !v.d->kv.empty();
      case Value::Fn: return true;
    }
    return false;
  }

  std::string repr(const Value& v, int line, int depth = 0) const {
    if (v.t == Value::Str) return py_repr_str(v.s);
    if (v.t == Value::Undef) return "Undefined";
    return str(v, line, depth);
  }
  std::string str(const Value& v, int line, int depth = 0) const {
    if (depth > 256) fail(line, "a value nests deeper than 256 levels (a namespace holding itself?)");
    switch (v.t) {
      case Value::Undef: return "";
      case Value::None: return "None";
      case Value::Bool: return v.b ? "True" : "False";
      case Value::Int: return std::to_string(v.i);
      case Value::Float: return py_float(v.f);
      case Value::Str: return v.s;
      case Value::List: {
        std::string r = v.tuple ? "(" : "[";
        for (size_t k = 0; k < v.l->size(); ++k) {
          if (k) r += ", ";
          r += repr((*v.l)[k], line, depth + 1);
          check_size(r.size(), line);
        }
        if (v.tuple && v.l->size() == 1) r += ",";
        return r + (v.tuple ? ")" : "]");
      }
      case Value::Dict: {
        std::string r = v.d->ns ? "<Namespace {" : "{";
        bool first = true;
        for (const auto& kv : v.d->kv) {
          if (!first) r += ", ";
          first = false;
          r += py_repr_str(kv.first) + ": " + repr(kv.second, line, depth + 1);
          check_size(r.size(), line);
        }
        return r + (v.d->ns ? "}>" : "}");
      }
      case Value::Fn: return "<function " + v.fn->name + ">";
    }
    return "";
  }

  bool eq(const Value& x, const Value& y, int line, int depth = 0) const {
    if (depth > 256) fail(line, "a value nests deeper than 256 levels (a namespace holding itself?)");
    if (x.is_num() && y.is_num()) {
      if (x.t == Value::Float || y.t == Value::Float) return x.as_double() == y.as_double();
      return x.as_int() == y.as_int();
    }
    if (x.t != y.t) return false;
    switch (x.t) {
      case Value::Undef: case Value::None: return true;
      case Value::Str: return x.s == y.s;
      case Value::List:
        if (x.tuple != y.tuple || x.l->size() != y.l->size()) return false;
        for (size_t k = 0; k < x.l->size(); ++k)
          if (!eq((*x.l)[k], (*y.l)[k], line, depth + 1)) return false;
        return true;
      case Value::Dict:
        if (x.d->ns || y.d->ns) return x.d == y.d;
        if (x.d->kv.size() != y.d->kv.size()) return false;
        for (const auto& kv : x.d->kv) {
          const Value* o = y.d->get(kv.first);
          if (!o || !eq(kv.second, *o, line, depth + 1)) return false;
        }
        return true;
      case Value::Fn: return x.fn == y.fn;
      default: return false;
    }
  }

  // x < y as Python orders them; TypeError where Python has none.
  bool less(const Value& x, const Value& y, int line, const char* op = "<", int depth = 0) const {
    if (depth > 256) fail(line, "a value nests deeper than 256 levels");
    if (x.t == Value::Undef) undefined_error(x, line);
    if (y.t == Value::Undef) undefined_error(y, line);
    if (x.is_num() && y.is_num()) {
      if (x.t == Value::Float || y.t == Value::Float) return x.as_double() < y.as_double();
      return x.as_int() < y.as_int();
    }
    if (x.t == Value::Str && y.t == Value::Str) return x.s < y.s;  // UTF-8 bytes order as code points
    if (x.t == Value::List && y.t == Value::List && x.tuple == y.tuple) {
      const size_t n = std::min(x.l->size(), y.l->size());
      for (size_t k = 0; k < n; ++k) {
        if (eq((*x.l)[k], (*y.l)[k], line)) continue;
        return less((*x.l)[k], (*y.l)[k], line, op, depth + 1);
      }
      return x.l->size() < y.l->size();
    }
    fail(line, detail::cat("'", op, "' not supported between instances of '", type_name(x), "' and '", type_name(y), "'"));
  }

  bool contains(const Value& container, const Value& item, int line) const {
    switch (container.t) {
      case Value::Str:
        if (item.t != Value::Str)
          fail(line, detail::cat("'in <string>' requires string as left operand, not ", type_name(item)));
        return container.s.find(item.s) != std::string::npos;
      case Value::List:
        for (const auto& x : *container.l)
          if (eq(x, item, line)) return true;
        return false;
      case Value::Dict:
        return item.t == Value::Str && container.d->get(item.s) != nullptr;
      case Value::Undef: return false;
      default: fail(line, detail::cat("argument of type '", type_name(container), "' is not iterable"));
    }
  }

  std::vector<Value> iterate(const Value& v, int line) const {
    switch (v.t) {
      case Value::List: return *v.l;
      case Value::Dict: {
        if (v.d->ns) break;
        std::vector<Value> r;
        for (const auto& kv : v.d->kv) r.push_back(Value::str(kv.first));
        return r;
      }
      case Value::Str: {
        std::vector<Value> r;
        for (char32_t c : to_u32(v.s)) r.push_back(Value::str(to_u8(std::u32string(1, c))));
        return r;
      }
      case Value::Undef: return {};
      default: break;
    }
    fail(line, detail::cat("'", type_name(v), "' object is not iterable"));
  }

  int64_t length(const Value& v, int line) const {
    switch (v.t) {
      case Value::Str: return int64_t(u8_length(v.s));
      case Value::List: return int64_t(v.l->size());
      case Value::Dict:
        if (!v.d->ns) return int64_t(v.d->kv.size());
        break;
      case Value::Undef: return 0;
      default: break;
    }
    fail(line, detail::cat("object of type '", type_name(v), "' has no len()"));
  }

  // -------- attribute and item access (jinja2's environment.getattr / getitem)

  Value method(const Value& obj, const std::string& name, int line) const;

  Value getattr(const Value& obj, const std::string& name, int line) const {
    if (obj.t == Value::Undef) undefined_error(obj, line);
    Value m = method(obj, name, line);
    if (m.t != Value::Undef) return m;
    if (obj.t == Value::Dict) {
      if (const Value* v = obj.d->get(name)) return *v;
      return Value::undef(detail::cat("'", obj.d->ns ? "Namespace" : "dict", " object' has no attribute '", name, "'"));
    }
    return Value::undef(detail::cat("'", type_name(obj), " object' has no attribute '", name, "'"));
  }

  Value getitem(const Value& obj, const Value& key, int line) const {
    if (obj.t == Value::Undef) undefined_error(obj, line);
    if (obj.t == Value::Dict && key.t == Value::Str) {
      if (const Value* v = obj.d->get(key.s)) return *v;
    }
    if ((obj.t == Value::List || obj.t == Value::Str) && key.is_intlike()) {
      int64_t k = key.as_int();
      if (obj.t == Value::List) {
        const int64_t n = int64_t(obj.l->size());
        if (k < 0) k += n;
        if (k >= 0 && k < n) return (*obj.l)[size_t(k)];
      } else {
        const std::u32string u = to_u32(obj.s);
        const int64_t n = int64_t(u.size());
        if (k < 0) k += n;
        if (k >= 0 && k < n) return Value::str(to_u8(u.substr(size_t(k), 1)));
      }
      return Value::undef(detail::cat(type_name(obj), " object has no element ", key.as_int()));
    }
    if (key.t == Value::Str) {
      Value m = method(obj, key.s, line);
      if (m.t != Value::Undef) return m;
      if (obj.t == Value::Dict)
        return Value::undef(detail::cat("'", obj.d->ns ? "Namespace" : "dict", " object' has no attribute '", key.s, "'"));
      return Value::undef(detail::cat("'", type_name(obj), " object' has no attribute '", key.s, "'"));
    }
    return Value::undef(detail::cat("'", type_name(obj), " object' has no element ", repr(key, line)));
  }

  Value slice(const Value& obj, const Value* start, const Value* stop, const Value* stepv, int line) const {
    if (obj.t == Value::Undef) undefined_error(obj, line);
    auto idx = [&](const Value* v, const char* what) -> std::optional<int64_t> {
      if (!v || v->t == Value::None) return std::nullopt;
      if (!v->is_intlike()) fail(line, detail::cat("slice ", what, " must be an integer or none, got ", type_name(*v)));
      return v->as_int();
    };
    const auto st = idx(stepv, "step");
    const int64_t s = st.value_or(1);
    if (s == 0) fail(line, "slice step cannot be zero");
    std::u32string u;
    int64_t n;
    if (obj.t == Value::List) n = int64_t(obj.l->size());
    else if (obj.t == Value::Str) {
      u = to_u32(obj.s);
      n = int64_t(u.size());
    } else {
      fail(line, detail::cat("'", type_name(obj), "' object is not subscriptable"));
    }
    auto clamp = [&](std::optional<int64_t> v, int64_t def) {
      if (!v) return def;
      int64_t x = *v;
      if (x < 0) x += n;
      if (s > 0) return std::clamp<int64_t>(x, 0, n);
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    const int64_t a = clamp(idx(start, "start"), s > 0 ? 0 : n - 1);
    const int64_t b = clamp(idx(stop, "stop"), s > 0 ? n : -1);
    std::vector<Value> lv;
    std::u32string su;
    for (int64_t k = a; s > 0 ? k < b : k > b; k += s) {
      if (obj.t == Value::List) lv.push_back((*obj.l)[size_t(k)]);
      else su.push_back(u[size_t(k)]);
    }
    if (obj.t == Value::List) return Value::list(std::move(lv), obj.tuple);
    return Value::str(to_u8(su));
  }

  // -------- operators

  Value arith(const std::string& op, const Value& x, const Value& y, int line) {
    if (x.t == Value::Undef) undefined_error(x, line);
    if (y.t == Value::Undef) undefined_error(y, line);
    auto bad = [&]() -> Value {
      fail(line, detail::cat("unsupported operand type(s) for ", op, ": '", type_name(x), "' and '", type_name(y), "'"));
    };
    if (x.is_num() && y.is_num()) {
      const bool fl = x.t == Value::Float || y.t == Value::Float;
      if (op == "/") {
        if (y.as_double() == 0) fail(line, "division by zero");
        return Value::flt(x.as_double() / y.as_double());
      }
      if (fl) {
        const double a = x.as_double(), b = y.as_double();
        if (op == "+") return Value::flt(a + b);
        if (op == "-") return Value::flt(a - b);
        if (op == "*") return Value::flt(a * b);
        if (op == "**") return Value::flt(std::pow(a, b));
        if (b == 0) fail(line, "float division by zero");
        if (op == "//") return Value::flt(std::floor(a / b));
        if (op == "%") {
          double m = std::fmod(a, b);
          if (m != 0 && ((m < 0) != (b < 0))) m += b;
          return Value::flt(m);
        }
      } else {
        const int64_t a = x.as_int(), b = y.as_int();
        int64_t r = 0;
        bool ovf = false;
        if (op == "+") ovf = __builtin_add_overflow(a, b, &r);
        else if (op == "-") ovf = __builtin_sub_overflow(a, b, &r);
        else if (op == "*") ovf = __builtin_mul_overflow(a, b, &r);
        else if (op == "**") {
          if (b < 0) return Value::flt(std::pow(double(a), double(b)));
          r = 1;
          for (int64_t k = 0; k < b && !ovf; ++k) {
            ovf = __builtin_mul_overflow(r, a, &r);
            if (r == 0 || r == 1) break;
          }
          if (!ovf && r == -1 && b % 2 == 0) r = 1;
        } else {
          if (b == 0) fail(line, "integer division or modulo by zero");
          if (a == INT64_MIN && b == -1) ovf = true;
          else {
            int64_t q = a / b, m = a % b;
            if (m != 0 && ((m < 0) != (b < 0))) {
              --q;
              m += b;
            }
            r = op == "//" ? q : m;
          }
        }
        if (ovf) fail(line, "integer overflow in " + op + " (integers are 64-bit here)");
        return Value::integer(r);
      }
      return bad();
    }
    if (op == "+") {
      if (x.t == Value::Str && y.t == Value::Str) {
        check_size(x.s.size() + y.s.size(), line);
        step(line, (x.s.size() + y.s.size()) / 64);
        if (x.markup == y.markup) {
          Value r = Value::str(x.s + y.s);
          r.markup = x.markup;
          return r;
        }
        // markupsafe: Markup + str escapes the str (and the sum is Markup).
        Value r = Value::str((x.markup ? x.s : html_escape(x.s)) + (y.markup ? y.s : html_escape(y.s)));
        r.markup = true;
        check_size(r.s.size(), line);
        return r;
      }
      if (x.t == Value::List && y.t == Value::List && x.tuple == y.tuple) {
        check_size(x.l->size() + y.l->size(), line);
        step(line, x.l->size() + y.l->size());
        std::vector<Value> r = *x.l;
        r.insert(r.end(), y.l->begin(), y.l->end());
        return Value::list(std::move(r), x.tuple);
      }
      return bad();
    }
    if (op == "*") {
      const Value* seq = x.is_intlike() ? &y : &x;
      const Value* cnt = x.is_intlike() ? &x : &y;
      if (!cnt->is_intlike() || (seq->t != Value::Str && seq->t != Value::List)) return bad();
      const int64_t c = std::max<int64_t>(cnt->as_int(), 0);
      const size_t unit = seq->t == Value::Str ? seq->s.size() : seq->l->size();
      if (unit && uint64_t(c) > lim.max_output / unit) check_size(lim.max_output + 1, line);
      step(line, unit * size_t(c) / 64);
      if (seq->t == Value::Str) {
        std::string r;
        for (int64_t k = 0; k < c; ++k) r += seq->s;
        return Value::str(std::move(r));
      }
      std::vector<Value> r;
      for (int64_t k = 0; k < c; ++k) r.insert(r.end(), seq->l->begin(), seq->l->end());
      return Value::list(std::move(r), seq->tuple);
    }
    if (op == "%" && x.t == Value::Str) fail(line, "printf-style string formatting ('...' % x) is not supported");
    return bad();
  }

  bool compare_op(const std::string& op, const Value& x, const Value& y, int line) const {
    if (op == "==") return eq(x, y, line);
    if (op == "!=") return !eq(x, y, line);
    if (op == "<") return less(x, y, line, "<");
    if (op == ">") return less(y, x, line, ">");
    if (op == "<=") return !less(y, x, line, "<=");
    if (op == ">=") return !less(x, y, line, ">=");
    if (op == "in") return contains(y, x, line);
    return !contains(y, x, line);  // not in
  }

  // -------- variables

  Value lookup(const std::string& name) const {
    for (size_t k = frames.size(); k-- > 0;)
      for (const auto& kv : frames[k])
        if (kv.first == name) return kv.second;
    Value g = global(name);
    if (g.t != Value::Undef) return g;
    return Value::undef("'" + name + "' is undefined");
  }
  void assign(const std::string& name, Value v) {
    auto& f = frames.back();
    for (auto& kv : f)
      if (kv.first == name) {
        kv.second = std::move(v);
        return;
      }
    f.emplace_back(name, std::move(v));
  }

  Value global(const std::string& name) const;

  // -------- expressions

  Args eval_args(const Expr& e, size_t first) {
    Args a;
    for (size_t k = first; k < e.a.size(); ++k) a.pos.push_back(eval(*e.a[k]));
    for (const auto& kv : e.kw) a.kw.emplace_back(kv.first, eval(*kv.second));
    return a;
  }

  Value eval(const Expr& e) {
    step(e.line);
    Frame guard(*this, e.line);
    switch (e.k) {
      case Expr::Lit: return e.lit;
      case Expr::Name: return lookup(e.name);
      case Expr::Attr: return getattr(eval(*e.a[0]), e.name, e.line);
      case Expr::Item: {
        Value o = eval(*e.a[0]);
        return getitem(o, eval(*e.a[1]), e.line);
      }
      case Expr::Slice: {
        Value o = eval(*e.a[0]);
        Value b[3];
        for (int k = 0; k < 3; ++k)
          if (e.a[size_t(k) + 1]) b[k] = eval(*e.a[size_t(k) + 1]);
        return slice(o, e.a[1] ? &b[0] : nullptr, e.a[2] ? &b[1] : nullptr, e.a[3] ? &b[2] : nullptr, e.line);
      }
      case Expr::Call: {
        Value f = eval(*e.a[0]);
        Args a = eval_args(e, 1);
        if (f.t == Value::Undef) undefined_error(f, e.line);
        if (f.t != Value::Fn) fail(e.line, detail::cat("'", type_name(f), "' object is not callable"));
        return f.fn->call(*this, a, e.line);
      }
      case Expr::Filter: {
        Value v = e.a[0] ? eval(*e.a[0]) : Value();
        Args a = eval_args(e, 1);
        return filter(e.name, v, a, e.line);
      }
      case Expr::Test: {
        Value v = eval(*e.a[0]);
        Args a = eval_args(e, 1);
        return Value::boolean(test(e.name, v, a, e.line) != e.neg);
      }
      case Expr::Neg: case Expr::Pos: {
        Value v = eval(*e.a[0]);
        if (v.t == Value::Undef) undefined_error(v, e.line);
        if (!v.is_num())
          fail(e.line, detail::cat("bad operand type for unary ", e.k == Expr::Neg ? "-" : "+", ": '", type_name(v), "'"));
        if (e.k == Expr::Pos) return v.t == Value::Bool ? Value::integer(v.as_int()) : v;
        if (v.t == Value::Float) return Value::flt(-v.f);
        if (v.as_int() == INT64_MIN) fail(e.line, "integer overflow in unary -");
        return Value::integer(-v.as_int());
      }
      case Expr::Bin: {
        Value x = eval(*e.a[0]);
        Value y = eval(*e.a[1]);
        return arith(e.name, x, y, e.line);
      }
      case Expr::Cmp: {
        Value x = eval(*e.a[0]);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value y = eval(*e.a[k + 1]);
          if (!compare_op(e.ops[k], x, y, e.line)) return Value::boolean(false);
          x = std::move(y);
        }
        return Value::boolean(true);
      }
      case Expr::And: {
        Value x = eval(*e.a[0]);
        return truthy(x) ? eval(*e.a[1]) : x;
      }
      case Expr::Or: {
        Value x = eval(*e.a[0]);
        return truthy(x) ? x : eval(*e.a[1]);
      }
      case Expr::Not: return Value::boolean(!truthy(eval(*e.a[0])));
      case Expr::Cond:
        if (truthy(eval(*e.a[0]))) return eval(*e.a[1]);
        if (e.a[2]) return eval(*e.a[2]);
        return Value::undef("the inline if expression evaluated to false and no else section was defined");
      case Expr::ListLit: case Expr::TupleLit: {
        std::vector<Value> v;
        for (const auto& x : e.a) v.push_back(eval(*x));
        return Value::list(std::move(v), e.k == Expr::TupleLit);
      }
      case Expr::DictLit: {
        Value d = Value::dict();
        for (size_t k = 0; k + 1 < e.a.size(); k += 2) {
          Value key = eval(*e.a[k]);
          if (key.t != Value::Str) fail(e.line, detail::cat("dict keys must be strings here, got ", type_name(key)));
          d.d->put(key.s, eval(*e.a[k + 1]));
        }
        return d;
      }
      case Expr::Concat: {
        std::string s;
        for (const auto& x : e.a) {
          s += str(eval(*x), e.line);
          check_size(s.size(), e.line);
        }
        step(e.line, s.size() / 64);
        return Value::str(std::move(s));
      }
    }
    return Value();
  }

  // -------- filters and tests

  static const Value* arg(const Args& a, size_t k, const char* name) {
    if (k < a.pos.size()) return &a.pos[k];
    for (const auto& kv : a.kw)
      if (kv.first == name) return &kv.second;
    return nullptr;
  }
  void check_args(const Args& a, const std::string& what, size_t max_pos, std::initializer_list<const char*> kws,
                  int line) const {
    if (a.pos.size() > max_pos)
      fail(line, detail::cat(what, " takes at most ", max_pos, " positional argument(s), got ", a.pos.size()));
    for (const auto& kv : a.kw) {
      bool ok = false;
      for (const char* k : kws) ok = ok || kv.first == k;
      if (!ok) fail(line, detail::cat(what, " got an unexpected keyword argument '", kv.first, "'"));
    }
  }
  std::string str_arg(const Args& a, size_t k, const char* name, const std::string& what, int line,
                      const char* def = nullptr) const {
    const Value* v = arg(a, k, name);
    if (!v) {
      if (def) return def;
      fail(line, detail::cat(what, " needs the argument '", name, "'"));
    }
    if (v->t != Value::Str) fail(line, detail::cat(what, ": '", name, "' must be a string, got ", type_name(*v)));
    return v->s;
  }

  void dump_json(std::string& out, const Value& v, bool ensure_ascii, const std::string* indent, const std::string& item_sep,
                 const std::string& key_sep, bool sort_keys, int level, int line) const {
    if (level > 256) fail(line, "tojson: a value nests deeper than 256 levels");
    if (out.size() > lim.max_output) check_size(out.size(), line);
    auto newline = [&](int lv) {
      out.push_back('\n');
      for (int k = 0; k < lv; ++k) out += *indent;
    };
    switch (v.t) {
      case Value::None: out += "null"; return;
      case Value::Bool: out += v.b ? "true" : "false"; return;
      case Value::Int: out += std::to_string(v.i); return;
      case Value::Float:
        if (std::isnan(v.f)) out += "NaN";
        else if (std::isinf(v.f)) out += v.f > 0 ? "Infinity" : "-Infinity";
        else out += py_float(v.f);
        return;
      case Value::Str: json_string(out, v.s, ensure_ascii); return;
      case Value::List: {
        if (v.l->empty()) {
          out += "[]";
          return;
        }
        out.push_back('[');
        for (size_t k = 0; k < v.l->size(); ++k) {
          if (k) out += item_sep;
          if (indent) newline(level + 1);
          dump_json(out, (*v.l)[k], ensure_ascii, indent, item_sep, key_sep, sort_keys, level + 1, line);
        }
        if (indent) newline(level);
        out.push_back(']');
        return;
      }
      case Value::Dict: {
        if (v.d->ns) break;
        if (v.d->kv.empty()) {
          out += "{}";
          return;
        }
        std::vector<const std::pair<std::string, Value>*> items;
        for (const auto& kv : v.d->kv) items.push_back(&kv);
        if (sort_keys)
          std::stable_sort(items.begin(), items.end(), [](const auto* p, const auto* q) { return p->first < q->first; });
        out.push_back('{');
        for (size_t k = 0; k < items.size(); ++k) {
          if (k) out += item_sep;
          if (indent) newline(level + 1);
          json_string(out, items[k]->first, ensure_ascii);
          out += key_sep;
          dump_json(out, items[k]->second, ensure_ascii, indent, item_sep, key_sep, sort_keys, level + 1, line);
        }
        if (indent) newline(level);
        out.push_back('}');
        return;
      }
      default: break;
    }
    fail(line, detail::cat("tojson: Object of type ", type_name(v), " is not JSON serializable",
                           v.t == Value::Undef && !v.s.empty() ? " (" + v.s + ")" : ""));
  }

  Value tojson(const Value& v, const Args& a, int line) const {
    // transformers' tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
    check_args(a, "tojson", 4, {"ensure_ascii", "indent", "separators", "sort_keys"}, line);
    const Value* ea = arg(a, 0, "ensure_ascii");
    const Value* ind = arg(a, 1, "indent");
    const Value* sep = arg(a, 2, "separators");
    const Value* sk = arg(a, 3, "sort_keys");
    std::string indent_s;
    const std::string* indent = nullptr;
    if (ind && ind->t != Value::None) {
      if (ind->is_intlike()) indent_s = std::string(size_t(std::clamp<int64_t>(ind->as_int(), 0, 1 << 16)), ' ');
      else if (ind->t == Value::Str) indent_s = ind->s;
      else fail(line, detail::cat("tojson: indent must be an integer or a string, got ", type_name(*ind)));
      indent = &indent_s;
    }
    std::string item_sep = indent ? "," : ", ", key_sep = ": ";
    if (sep && sep->t != Value::None) {
      if (sep->t != Value::List || sep->l->size() != 2 || (*sep->l)[0].t != Value::Str || (*sep->l)[1].t != Value::Str)
        fail(line, "tojson: separators must be a pair of strings");
      item_sep = (*sep->l)[0].s;
      key_sep = (*sep->l)[1].s;
    }
    std::string out;
    dump_json(out, v, ea && truthy(*ea), indent, item_sep, key_sep, sk && truthy(*sk), 0, line);
    check_size(out.size(), line);
    return Value::str(std::move(out));
  }

  std::vector<Value> sorted(std::vector<Value> items, bool reverse, bool case_sensitive, const Value* attribute,
                            int line) const {
    auto key = [&](const Value& v) {
      Value k = attribute ? attr_path(v, *attribute, line) : v;
      if (!case_sensitive && k.t == Value::Str) k.s = map_case(k.s, false);
      return k;
    };
    std::vector<std::pair<Value, Value>> kv;
    for (auto& v : items) kv.emplace_back(key(v), std::move(v));
    std::stable_sort(kv.begin(), kv.end(), [&](const auto& p, const auto& q) {
      return reverse ? less(q.first, p.first, line) : less(p.first, q.first, line);
    });
    std::vector<Value> r;
    for (auto& p : kv) r.push_back(std::move(p.second));
    return r;
  }

  // jinja2's make_attrgetter: "a.b" or "a.0" walks getitem.
  Value attr_path(const Value& v, const Value& attribute, int line) const {
    if (attribute.is_intlike()) return getitem(v, attribute, line);
    if (attribute.t != Value::Str) fail(line, "attribute must be a string or an integer");
    Value cur = v;
    size_t p = 0;
    for (;;) {
      const size_t q = attribute.s.find('.', p);
      const std::string part = attribute.s.substr(p, q == std::string::npos ? std::string::npos : q - p);
      const bool num = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return digit(c); });
      cur = num ? getitem(cur, Value::integer(std::stoll(part)), line) : getitem(cur, Value::str(part), line);
      if (q == std::string::npos) return cur;
      p = q + 1;
    }
  }

  Value filter(const std::string& name, const Value& v, Args& a, int line);
  std::string replace(const std::string& s, const std::string& old, const std::string& nw, int64_t count,
                      int line) const;
  bool test(const std::string& name, const Value& v, const Args& a, int line) const;

  // -------- statements

  enum class Flow { Normal, Break, Continue };

  Flow exec(const Body& body, std::string& out) {
    for (const auto& n : body) {
      const Flow f = exec(*n, out);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  void bind(const std::vector<std::string>& names, const Value& v, int line) {
    if (names.size() == 1) return assign(names[0], v);
    if (v.t != Value::List && v.t != Value::Str)
      fail(line, detail::cat("cannot unpack a '", type_name(v), "' into ", names.size(), " variables"));
    const std::vector<Value> items = iterate(v, line);
    if (items.size() != names.size())
      fail(line, detail::cat("cannot unpack ", items.size(), " values into ", names.size(), " variables"));
    for (size_t k = 0; k < names.size(); ++k) assign(names[k], items[k]);
  }

  std::string render_body(const Body& body) {
    std::string s;
    exec(body, s);
    return s;
  }

  Flow exec(const Node& n, std::string& out) {
    step(n.line);
    Frame guard(*this, n.line);
    switch (n.k) {
      case Node::Text: emit(out, n.text, n.line); return Flow::Normal;
      case Node::Out: emit(out, str(eval(*n.e), n.line), n.line); return Flow::Normal;
      case Node::If:
        for (const auto& br : n.branches)
          if (truthy(eval(*br.first))) return exec(br.second, out);
        return exec(n.else_body, out);
      case Node::For: {
        Value it = eval(*n.e);
        if (it.t == Value::Undef) it = Value::list({});
        std::vector<Value> items = iterate(it, n.line);
        if (n.cond) {
          std::vector<Value> kept;
          for (auto& x : items) {
            frames.emplace_back();
            bind(n.names, x, n.line);
            const bool keep = truthy(eval(*n.cond));
            frames.pop_back();
            if (keep) kept.push_back(std::move(x));
          }
          items = std::move(kept);
        }
        if (items.empty()) return exec(n.else_body, out);
        const int64_t len = int64_t(items.size());
        for (int64_t k = 0; k < len; ++k) {
          step(n.line);
          frames.emplace_back();
          bind(n.names, items[size_t(k)], n.line);
          Value loop = Value::dict();
          auto& kv = loop.d->kv;
          kv.emplace_back("index0", Value::integer(k));
          kv.emplace_back("index", Value::integer(k + 1));
          kv.emplace_back("revindex", Value::integer(len - k));
          kv.emplace_back("revindex0", Value::integer(len - k - 1));
          kv.emplace_back("first", Value::boolean(k == 0));
          kv.emplace_back("last", Value::boolean(k == len - 1));
          kv.emplace_back("length", Value::integer(len));
          kv.emplace_back("depth", Value::integer(1));
          kv.emplace_back("depth0", Value::integer(0));
          kv.emplace_back("previtem", k > 0 ? items[size_t(k - 1)] : Value::undef("there is no previous item"));
          kv.emplace_back("nextitem", k + 1 < len ? items[size_t(k + 1)] : Value::undef("there is no next item"));
          kv.emplace_back("cycle", make_func("loop.cycle", [k](Renderer&, Args& ca, int cl) -> Value {
                            if (ca.pos.empty()) fail(cl, "loop.cycle needs at least one argument");
                            return ca.pos[size_t(k) % ca.pos.size()];
                          }));
          assign("loop", loop);
          const Flow f = exec(n.body, out);
          frames.pop_back();
          if (f == Flow::Break) break;
        }
        return Flow::Normal;
      }
      case Node::Set: {
        Value v = eval(*n.e);
        if (n.attr) {
          Value ns = lookup(n.names[0]);
          if (ns.t != Value::Dict || !ns.d->ns)
            fail(n.line, detail::cat("cannot assign attribute on non-namespace object '", n.names[0], "' (",
                                     type_name(ns), ")"));
          ns.d->put(n.names[1], std::move(v));
        } else {
          bind(n.names, v, n.line);
        }
        return Flow::Normal;
      }
      case Node::SetBlock: {
        Value v = Value::str(render_body(n.body));
        for (const auto& f : n.filters) {
          Args a = eval_args(*f, 1);
          v = filter(f->name, v, a, f->line);
        }
        assign(n.names[0], std::move(v));
        return Flow::Normal;
      }
      case Node::FilterBlock: {
        Value v = Value::str(render_body(n.body));
        for (const auto& f : n.filters) {
          Args a = eval_args(*f, 1);
          v = filter(f->name, v, a, f->line);
        }
        emit(out, str(v, n.line), n.line);
        return Flow::Normal;
      }
      case Node::Macro: {
        const Node* m = &n;
        assign(n.text, make_func(n.text, [m](Renderer& r, Args& ca, int cl) { return r.call_macro(*m, ca, cl); }));
        return Flow::Normal;
      }
      case Node::Break: return Flow::Break;
      case Node::Continue: return Flow::Continue;
      case Node::Inline: return exec(n.body, out);
    }
    return Flow::Normal;
  }

  Value call_macro(const Node& m, Args& a, int line) {
    // A macro level is a dozen frames (eval, the call, the body's exec): under AddressSanitizer
    // 128 levels overflowed the 8 MB stack, so calls nest at most a quarter as deep as blocks.
    const int max_calls = std::max(8, lim.max_depth / 4);
    if (macro_depth >= max_calls)
      fail(line, detail::cat("macro '", m.text, "' calls nest deeper than ", max_calls, " levels"));
    if (a.pos.size() > m.params.size())
      fail(line, detail::cat("macro '", m.text, "' takes not more than ", m.params.size(), " argument(s)"));
    for (const auto& kv : a.kw) {
      bool ok = false;
      for (const auto& p : m.params) ok = ok || p.first == kv.first;
      if (!ok) fail(line, detail::cat("macro '", m.text, "' takes no keyword argument '", kv.first, "'"));
    }
    std::vector<std::vector<std::pair<std::string, Value>>> saved;
    saved.swap(frames);
    frames.push_back(saved[0]);
    frames.push_back(saved[1]);
    frames.emplace_back();
    struct Restore {
      Renderer& r;
      std::vector<std::vector<std::pair<std::string, Value>>>& s;
      ~Restore() {
        r.frames.swap(s);
        --r.macro_depth;
      }
    } restore{*this, saved};
    ++macro_depth;
    for (size_t k = 0; k < m.params.size(); ++k) {
      const Value* v = arg(a, k, m.params[k].first.c_str());
      if (v) assign(m.params[k].first, *v);
      else if (m.params[k].second) assign(m.params[k].first, eval(*m.params[k].second));
      else assign(m.params[k].first, Value::undef(detail::cat("parameter '", m.params[k].first, "' was not provided")));
    }
    std::string out;
    exec(m.body, out);
    return Value::str(std::move(out));
  }
};

Value Renderer::global(const std::string& name) const {
  if (name == "range")
    return make_func("range", [](Renderer& r, Args& a, int line) -> Value {
      r.check_args(a, "range", 3, {}, line);
      if (a.pos.empty()) fail(line, "range expected at least 1 argument, got 0");
      for (const auto& v : a.pos)
        if (!v.is_intlike()) fail(line, detail::cat("range: '", type_name(v), "' object cannot be interpreted as an integer"));
      int64_t start = 0, stop, st = 1;
      if (a.pos.size() == 1) stop = a.pos[0].as_int();
      else {
        start = a.pos[0].as_int();
        stop = a.pos[1].as_int();
        if (a.pos.size() == 3) st = a.pos[2].as_int();
      }
      if (st == 0) fail(line, "range() arg 3 must not be zero");
      std::vector<Value> v;
      for (int64_t k = start; st > 0 ? k < stop : k > stop; k += st) {
        if (v.size() >= 100000) fail(line, "range too big: the sandbox allows at most 100000 items");
        v.push_back(Value::integer(k));
      }
      return Value::list(std::move(v));
    });
  if (name == "namespace" || name == "dict")
    return make_func(name, [ns = name == "namespace"](Renderer& r, Args& a, int line) -> Value {
      Value d = Value::dict(ns);
      if (ns) r.namespaces.push_back(d.d);
      if (a.pos.size() > 1) fail(line, detail::cat(ns ? "namespace" : "dict", " takes at most 1 positional argument"));
      if (!a.pos.empty()) {
        if (a.pos[0].t != Value::Dict) fail(line, detail::cat(ns ? "namespace" : "dict", ": the argument must be a mapping"));
        for (const auto& kv : a.pos[0].d->kv) d.d->put(kv.first, kv.second);
      }
      for (auto& kv : a.kw) d.d->put(kv.first, kv.second);
      return d;
    });
  if (name == "raise_exception")
    return make_func(name, [](Renderer& r, Args& a, int line) -> Value {
      const std::string msg = a.pos.empty() ? std::string() : r.str(a.pos[0], line);
      fail(line, "the template raised an exception: " + msg);
    });
  if (name == "strftime_now")
    return make_func(name, [](Renderer& r, Args& a, int line) -> Value {
      const std::string fmt = r.str_arg(a, 0, "format", "strftime_now", line);
      const std::tm tm = r.clock();
      if (fmt.empty()) return Value::str("");
      std::string buf(256 + fmt.size() * 16, '\0');
      const size_t n = std::strftime(buf.data(), buf.size(), fmt.c_str(), &tm);
      buf.resize(n);
      return Value::str(buf);
    });
  return Value();
}

// Bound methods of str and dict (jinja2 looks attributes up before items).
Value Renderer::method(const Value& obj, const std::string& name, int line) const {
  (void)line;
  if (obj.t == Value::Dict && !obj.d->ns) {
    if (name != "items" && name != "keys" && name != "values" && name != "get") return Value();
    const std::shared_ptr<DictT> d = obj.d;
    return make_func("dict." + name, [d, name](Renderer& r, Args& a, int l) -> Value {
      if (name == "get") {
        r.check_args(a, "dict.get", 2, {}, l);
        if (a.pos.empty()) fail(l, "dict.get expected at least 1 argument, got 0");
        if (a.pos[0].t == Value::Str)
          if (const Value* v = d->get(a.pos[0].s)) return *v;
        return a.pos.size() > 1 ? a.pos[1] : Value::none();
      }
      r.check_args(a, "dict." + name, 0, {}, l);
      std::vector<Value> out;
      for (const auto& kv : d->kv) {
        if (name == "keys") out.push_back(Value::str(kv.first));
        else if (name == "values") out.push_back(kv.second);
        else out.push_back(Value::list({Value::str(kv.first), kv.second}, true));
      }
      return Value::list(std::move(out));
    });
  }
  if (obj.t != Value::Str) return Value();
  static const std::set<std::string> str_methods = {
      "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith", "upper", "lower", "title",
      "capitalize", "replace", "find", "count", "join", "isdigit", "isspace", "isalpha", "isalnum", "isupper", "islower"};
  if (!str_methods.count(name)) return Value();
  const std::string s = obj.s;
  return make_func("str." + name, [s, name](Renderer& r, Args& a, int l) -> Value {
    const std::string what = "str." + name;
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      r.check_args(a, what, 1, {}, l);
      std::u32string chars;
      const bool have = !a.pos.empty() && a.pos[0].t != Value::None;
      if (have) {
        if (a.pos[0].t != Value::Str) fail(l, what + ": the argument must be a string or none");
        chars = to_u32(a.pos[0].s);
      }
      return Value::str(py_strip(s, have ? &chars : nullptr, name != "rstrip", name != "lstrip"));
    }
    if (name == "split" || name == "rsplit") {
      r.check_args(a, what, 2, {"sep", "maxsplit"}, l);
      const Value* sepv = arg(a, 0, "sep");
      const Value* mv = arg(a, 1, "maxsplit");
      int64_t maxsplit = mv ? (mv->is_intlike() ? mv->as_int() : -2) : -1;
      if (maxsplit == -2) fail(l, what + ": maxsplit must be an integer");
      std::vector<std::string> parts;
      if (!sepv || sepv->t == Value::None) {
        const std::u32string u = to_u32(s);
        std::vector<std::pair<size_t, size_t>> words;
        for (size_t k = 0; k < u.size();) {
          while (k < u.size() && py_space(u[k])) ++k;
          if (k >= u.size()) break;
          size_t e = k;
          while (e < u.size() && !py_space(u[e])) ++e;
          words.emplace_back(k, e);
          k = e;
        }
        if (maxsplit >= 0 && words.size() > size_t(maxsplit) + 1) {
          if (name == "split") {
            size_t keep = size_t(maxsplit);
            size_t rest = words[keep].first, end = u.size();
            while (end > rest && py_space(u[end - 1])) --end;
            for (size_t k = 0; k < keep; ++k) parts.push_back(to_u8(u.substr(words[k].first, words[k].second - words[k].first)));
            parts.push_back(to_u8(u.substr(rest, end - rest)));
          } else {
            size_t first = words.size() - size_t(maxsplit);
            size_t b0 = 0, end = words[first - 1].second;
            while (b0 < end && py_space(u[b0])) ++b0;
            parts.push_back(to_u8(u.substr(b0, end - b0)));
            for (size_t k = first; k < words.size(); ++k)
              parts.push_back(to_u8(u.substr(words[k].first, words[k].second - words[k].first)));
          }
        } else {
          for (const auto& w : words) parts.push_back(to_u8(u.substr(w.first, w.second - w.first)));
        }
      } else {
        if (sepv->t != Value::Str) fail(l, what + ": sep must be a string or none");
        const std::string& sep = sepv->s;
        if (sep.empty()) fail(l, what + ": empty separator");
        if (name == "split") {
          size_t p = 0;
          for (int64_t c = 0; maxsplit < 0 || c < maxsplit; ++c) {
            const size_t q = s.find(sep, p);
            if (q == std::string::npos) break;
            parts.push_back(s.substr(p, q - p));
            p = q + sep.size();
          }
          parts.push_back(s.substr(p));
        } else {
          size_t e = s.size();
          std::vector<std::string> rev;
          for (int64_t c = 0; maxsplit < 0 || c < maxsplit; ++c) {
            if (e < sep.size()) break;
            const size_t q = s.rfind(sep, e - sep.size());
            if (q == std::string::npos) break;
            rev.push_back(s.substr(q + sep.size(), e - q - sep.size()));
            e = q;
          }
          rev.push_back(s.substr(0, e));
          parts.assign(rev.rbegin(), rev.rend());
        }
      }
      std::vector<Value> out;
      for (auto& p : parts) out.push_back(Value::str(std::move(p)));
      return Value::list(std::move(out));
    }
    if (name == "splitlines") {
      r.check_args(a, what, 1, {"keepends"}, l);
      const Value* ke = arg(a, 0, "keepends");
      const bool keep = ke && truthy(*ke);
      std::vector<Value> out;
      size_t p = 0;
      while (p < s.size()) {
        size_t q = s.find_first_of("\n\r\v\f\x1c\x1d\x1e", p);
        if (q == std::string::npos) {
          out.push_back(Value::str(s.substr(p)));
          break;
        }
        size_t e = q + 1;
        if (s[q] == '\r' && e < s.size() && s[e] == '\n') ++e;
        out.push_back(Value::str(s.substr(p, (keep ? e : q) - p)));
        p = e;
      }
      return Value::list(std::move(out));
    }
    if (name == "startswith" || name == "endswith") {
      r.check_args(a, what, 1, {}, l);
      if (a.pos.empty()) fail(l, what + " takes exactly one argument");
      std::vector<Value> cands = a.pos[0].t == Value::List ? *a.pos[0].l : std::vector<Value>{a.pos[0]};
      for (const auto& c : cands) {
        if (c.t != Value::Str) fail(l, what + ": the argument must be a string or a tuple of strings");
        if (name == "startswith" ? s.compare(0, c.s.size(), c.s) == 0
                                 : (s.size() >= c.s.size() && s.compare(s.size() - c.s.size(), c.s.size(), c.s) == 0))
          return Value::boolean(true);
      }
      return Value::boolean(false);
    }
    if (name == "upper" || name == "lower") {
      r.check_args(a, what, 0, {}, l);
      return Value::str(map_case(s, name == "upper"));
    }
    if (name == "title") {
      r.check_args(a, what, 0, {}, l);
      const std::u32string u = to_u32(s);
      std::u32string t = u;
      bool prev_cased = false;
      for (size_t k = 0; k < u.size(); ++k) {
        const bool cased = uc_is_lower(u[k]) || uc_is_upper(u[k]);
        if (cased) t[k] = prev_cased ? lower_at(u, k) : uc_upper(u[k]);
        prev_cased = cased;
      }
      return Value::str(to_u8(t));
    }
    if (name == "capitalize") {
      r.check_args(a, what, 0, {}, l);
      return Value::str(py_capitalize(s));
    }
    if (name == "replace") {
      r.check_args(a, what, 3, {}, l);
      if (a.pos.size() < 2 || a.pos[0].t != Value::Str || a.pos[1].t != Value::Str)
        fail(l, what + " needs two string arguments");
      const int64_t count = a.pos.size() > 2 && a.pos[2].is_intlike() ? a.pos[2].as_int() : -1;
      return Value::str(r.replace(s, a.pos[0].s, a.pos[1].s, count, l));
    }
    if (name == "find" || name == "count") {
      r.check_args(a, what, 1, {}, l);
      if (a.pos.empty() || a.pos[0].t != Value::Str) fail(l, what + " needs a string argument");
      const std::string& sub = a.pos[0].s;
      if (name == "find") {
        const size_t q = s.find(sub);
        return Value::integer(q == std::string::npos ? -1 : int64_t(u8_length(s.substr(0, q))));
      }
      if (sub.empty()) return Value::integer(int64_t(u8_length(s)) + 1);
      int64_t c = 0;
      for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++c;
      return Value::integer(c);
    }
    if (name == "join") {
      r.check_args(a, what, 1, {}, l);
      if (a.pos.empty()) fail(l, "str.join takes exactly one argument");
      std::string out;
      bool first = true;
      for (const auto& x : r.iterate(a.pos[0], l)) {
        if (x.t != Value::Str) fail(l, detail::cat("str.join: expected str instance, ", type_name(x), " found"));
        if (!first) out += s;
        first = false;
        out += x.s;
        r.check_size(out.size(), l);
      }
      return Value::str(std::move(out));
    }
    r.check_args(a, what, 0, {}, l);
    if (s.empty()) return Value::boolean(false);
    const std::u32string u = to_u32(s);
    bool all = true, any_cased = false;
    for (char32_t c : u) {
      if (name == "isdigit") all = all && c >= '0' && c <= '9';
      else if (name == "isspace") all = all && py_space(c);
      else if (name == "isalpha") all = all && ascii_alpha(c);
      else if (name == "isalnum") all = all && (ascii_alpha(c) || (c >= '0' && c <= '9'));
      else if (name == "isupper") {
        all = all && !uc_is_lower(c);
        any_cased = any_cased || uc_is_upper(c);
      } else {
        all = all && !uc_is_upper(c);
        any_cased = any_cased || uc_is_lower(c);
      }
    }
    if (name == "isupper" || name == "islower") return Value::boolean(all && any_cased);
    return Value::boolean(all);
  });
}


std::string Renderer::replace(const std::string& s, const std::string& old, const std::string& nw, int64_t count,
                              int line) const {
  std::string out;
  if (old.empty()) {  // Python inserts `nw` before every character and at the end
    const std::u32string u = to_u32(s);
    int64_t done = 0;
    for (size_t k = 0; k <= u.size(); ++k) {
      if (count < 0 || done < count) {
        out += nw;
        ++done;
      }
      if (k < u.size()) put_u8(out, u[k]);
      check_size(out.size(), line);
    }
    return out;
  }
  size_t p = 0;
  for (int64_t done = 0; count < 0 || done < count; ++done) {
    const size_t q = s.find(old, p);
    if (q == std::string::npos) break;
    out.append(s, p, q - p);
    out += nw;
    p = q + old.size();
    check_size(out.size(), line);
  }
  out.append(s, p, std::string::npos);
  check_size(out.size(), line);
  return out;
}

Value Renderer::filter(const std::string& name, const Value& v, Args& a, int line) {
  const std::string what = "filter '" + name + "'";
  auto s_of = [&](const Value& x) { return str(x, line); };
  if (name == "abs") {
    check_args(a, what, 0, {}, line);
    if (v.t == Value::Float) return Value::flt(std::fabs(v.f));
    if (v.is_intlike()) {
      if (v.as_int() == INT64_MIN) fail(line, "integer overflow in abs");
      return Value::integer(std::llabs(v.as_int()));
    }
    fail(line, detail::cat(what, ": bad operand type '", type_name(v), "'"));
  }
  if (name == "capitalize") {
    check_args(a, what, 0, {}, line);
    return Value::str(py_capitalize(s_of(v)));
  }
  if (name == "length" || name == "count") {
    check_args(a, what, 0, {}, line);
    return Value::integer(length(v, line));
  }
  if (name == "default" || name == "d") {
    check_args(a, what, 2, {"default_value", "boolean"}, line);
    const Value* def = arg(a, 0, "default_value");
    const Value* boolean = arg(a, 1, "boolean");
    if (v.t == Value::Undef || (boolean && truthy(*boolean) && !truthy(v))) return def ? *def : Value::str("");
    return v;
  }
  if (name == "dictsort") {
    check_args(a, what, 3, {"case_sensitive", "by", "reverse"}, line);
    if (v.t != Value::Dict || v.d->ns) fail(line, what + ": the value must be a mapping");
    const Value* cs = arg(a, 0, "case_sensitive");
    const std::string by = str_arg(a, 1, "by", what, line, "key");
    const Value* rev = arg(a, 2, "reverse");
    if (by != "key" && by != "value") fail(line, what + ": 'by' must be 'key' or 'value'");
    std::vector<Value> items;
    for (const auto& kv : v.d->kv) items.push_back(Value::list({Value::str(kv.first), kv.second}, true));
    const Value pos = Value::integer(by == "key" ? 0 : 1);
    return Value::list(sorted(std::move(items), rev && truthy(*rev), cs && truthy(*cs), &pos, line));
  }
  if (name == "escape" || name == "e") {
    check_args(a, what, 0, {}, line);
    if (v.t == Value::Str && v.markup) return v;
    Value r = Value::str(html_escape(s_of(v)));
    r.markup = true;
    return r;
  }
  if (name == "first" || name == "last") {
    check_args(a, what, 0, {}, line);
    if (v.t == Value::Dict && v.d->ns) fail(line, what + ": a namespace is not a sequence");
    std::vector<Value> items = iterate(v, line);
    if (items.empty()) return Value::undef(detail::cat("No ", name, " item, sequence was empty."));
    return name == "first" ? items.front() : items.back();
  }
  if (name == "int" || name == "float") {
    check_args(a, what, name == "int" ? 2 : 1, {"default", "base"}, line);
    const Value* def = arg(a, 0, "default");
    const Value fallback = def ? *def : (name == "int" ? Value::integer(0) : Value::flt(0.0));
    if (v.t == Value::Bool || v.t == Value::Int) return name == "int" ? Value::integer(v.as_int()) : Value::flt(v.as_double());
    if (v.t == Value::Float) {
      if (name == "float") return v;
      if (!std::isfinite(v.f) || std::fabs(v.f) >= 9.2e18) return fallback;
      return Value::integer(int64_t(v.f));
    }
    if (v.t != Value::Str) return fallback;
    std::string t = py_strip(v.s, nullptr, true, true);
    t.erase(std::remove(t.begin(), t.end(), '_'), t.end());
    if (t.empty()) return fallback;
    errno = 0;
    char* end = nullptr;
    if (name == "int") {
      const long long x = std::strtoll(t.c_str(), &end, 10);
      if (errno == 0 && end && *end == '\0') return Value::integer(x);
    }
    errno = 0;
    const double x = std::strtod(t.c_str(), &end);
    if (errno != 0 || !end || *end != '\0') return fallback;
    if (name == "float") return Value::flt(x);
    if (!std::isfinite(x) || std::fabs(x) >= 9.2e18) return fallback;
    return Value::integer(int64_t(x));
  }
  if (name == "indent") {
    check_args(a, what, 3, {"width", "first", "blank"}, line);
    const Value* w = arg(a, 0, "width");
    const Value* first = arg(a, 1, "first");
    const Value* blank = arg(a, 2, "blank");
    std::string ind(4, ' ');
    if (w && w->t == Value::Str) ind = w->s;
    else if (w && w->is_intlike()) ind = std::string(size_t(std::clamp<int64_t>(w->as_int(), 0, 1 << 16)), ' ');
    else if (w) fail(line, what + ": width must be an integer or a string");
    const std::string s = s_of(v) + "\n";
    std::vector<std::string> lines;
    for (size_t p = 0; p < s.size();) {
      size_t q = s.find_first_of("\n\r", p);
      lines.push_back(s.substr(p, q - p));
      p = q + 1 + (s[q] == '\r' && q + 1 < s.size() && s[q + 1] == '\n' ? 1 : 0);
    }
    std::string r;
    for (size_t k = 0; k < lines.size(); ++k) {
      if (k) {
        r += "\n";
        if (!lines[k].empty() || (blank && truthy(*blank))) r += ind;
      }
      r += lines[k];
      check_size(r.size(), line);
    }
    if (first && truthy(*first)) r = ind + r;
    return Value::str(r);
  }
  if (name == "items") {
    check_args(a, what, 0, {}, line);
    if (v.t == Value::Undef) return Value::list({});
    if (v.t != Value::Dict || v.d->ns) fail(line, "filter 'items': Can only get item pairs from a mapping.");
    std::vector<Value> items;
    for (const auto& kv : v.d->kv) items.push_back(Value::list({Value::str(kv.first), kv.second}, true));
    return Value::list(std::move(items));
  }
  if (name == "join") {
    check_args(a, what, 2, {"d", "attribute"}, line);
    const std::string sep = str_arg(a, 0, "d", what, line, "");
    const Value* attribute = arg(a, 1, "attribute");
    std::string r;
    bool first = true;
    for (const auto& x : iterate(v, line)) {
      if (!first) r += sep;
      first = false;
      r += s_of(attribute ? attr_path(x, *attribute, line) : x);
      check_size(r.size(), line);
    }
    return Value::str(std::move(r));
  }
  if (name == "list") {
    check_args(a, what, 0, {}, line);
    return Value::list(iterate(v, line));
  }
  if (name == "lower" || name == "upper") {
    check_args(a, what, 0, {}, line);
    return Value::str(map_case(s_of(v), name == "upper"));
  }
  if (name == "map") {
    std::vector<Value> out;
    const std::vector<Value> items = iterate(v, line);
    const Value* attribute = nullptr;
    for (const auto& kv : a.kw)
      if (kv.first == "attribute") attribute = &kv.second;
    if (attribute) {
      check_args(a, what, 0, {"attribute", "default"}, line);
      const Value* def = arg(a, 99, "default");
      for (const auto& x : items) {
        Value y = attr_path(x, *attribute, line);
        out.push_back(y.t == Value::Undef && def ? *def : y);
      }
      return Value::list(std::move(out));
    }
    if (a.pos.empty() || a.pos[0].t != Value::Str) fail(line, what + ": give a filter name or attribute=");
    const std::string fname = a.pos[0].s;
    if (!known_filters().count(fname)) fail(line, "no filter named '" + fname + "'");
    Args rest;
    rest.pos.assign(a.pos.begin() + 1, a.pos.end());
    rest.kw = a.kw;
    for (const auto& x : items) {
      Args each = rest;
      out.push_back(filter(fname, x, each, line));
    }
    return Value::list(std::move(out));
  }
  if (name == "max" || name == "min") {
    check_args(a, what, 2, {"case_sensitive", "attribute"}, line);
    const Value* cs = arg(a, 0, "case_sensitive");
    const Value* attribute = arg(a, 1, "attribute");
    std::vector<Value> items = sorted(iterate(v, line), false, cs && truthy(*cs), attribute, line);
    if (items.empty()) return Value::undef("No aggregated item, sequence was empty.");
    if (name == "min") return items.front();
    // max: the first of the largest, as Python's max keeps it
    size_t k = items.size() - 1;
    Value key_last = attribute ? attr_path(items[k], *attribute, line) : items[k];
    while (k > 0) {
      Value kp = attribute ? attr_path(items[k - 1], *attribute, line) : items[k - 1];
      if (!(cs && truthy(*cs)) && kp.t == Value::Str) kp.s = map_case(kp.s, false);
      Value kl = key_last;
      if (!(cs && truthy(*cs)) && kl.t == Value::Str) kl.s = map_case(kl.s, false);
      if (!eq(kp, kl, line)) break;
      --k;
    }
    return items[k];
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool by_attr = name.size() > 6;
    const bool want = name[0] == 's';
    size_t k0 = 0;
    const Value* attribute = nullptr;
    if (by_attr) {
      if (a.pos.empty()) fail(line, what + " needs an attribute name");
      attribute = &a.pos[0];
      k0 = 1;
    }
    std::string tname;
    Args targs;
    if (a.pos.size() > k0) {
      if (a.pos[k0].t != Value::Str) fail(line, what + ": the test name must be a string");
      tname = a.pos[k0].s;
      if (!known_tests().count(tname)) fail(line, "no test named '" + tname + "'");
      targs.pos.assign(a.pos.begin() + long(k0) + 1, a.pos.end());
    }
    targs.kw = a.kw;
    std::vector<Value> out;
    for (const auto& x : iterate(v, line)) {
      const Value y = attribute ? attr_path(x, *attribute, line) : x;
      const bool ok = tname.empty() ? truthy(y) : test(tname, y, targs, line);
      if (ok == want) out.push_back(x);
    }
    return Value::list(std::move(out));
  }
  if (name == "replace") {
    check_args(a, what, 3, {"old", "new", "count"}, line);
    const Value* o = arg(a, 0, "old");
    const Value* nw = arg(a, 1, "new");
    const Value* c = arg(a, 2, "count");
    if (!o || !nw) fail(line, what + " needs the arguments old and new");
    if (c && c->t != Value::None && !c->is_intlike()) fail(line, what + ": count must be an integer");
    return Value::str(replace(s_of(v), s_of(*o), s_of(*nw), c && c->t != Value::None ? c->as_int() : -1, line));
  }
  if (name == "reverse") {
    check_args(a, what, 0, {}, line);
    if (v.t == Value::Str) {
      std::u32string u = to_u32(v.s);
      std::reverse(u.begin(), u.end());
      return Value::str(to_u8(u));
    }
    std::vector<Value> items = iterate(v, line);
    std::reverse(items.begin(), items.end());
    return Value::list(std::move(items));
  }
  if (name == "round") {
    check_args(a, what, 2, {"precision", "method"}, line);
    const Value* pr = arg(a, 0, "precision");
    const std::string method = str_arg(a, 1, "method", what, line, "common");
    if (!v.is_num()) fail(line, what + ": the value must be a number");
    const int64_t p = pr ? (pr->is_intlike() ? pr->as_int() : 0) : 0;
    const double scale = std::pow(10.0, double(p));
    const double x = v.as_double() * scale;
    double r;
    if (method == "common") r = std::nearbyint(x);  // Python's round: half to even
    else if (method == "ceil") r = std::ceil(x);
    else if (method == "floor") r = std::floor(x);
    else fail(line, what + ": method must be common, ceil or floor");
    return Value::flt(r / scale);
  }
  if (name == "safe" || name == "string") {
    check_args(a, what, 0, {}, line);
    if (v.t == Value::Str) {
      Value r = v;
      r.markup = r.markup || name == "safe";
      return r;
    }
    Value r = Value::str(s_of(v));
    r.markup = name == "safe";
    return r;
  }
  if (name == "sort" || name == "unique") {
    const bool srt = name == "sort";
    if (srt) check_args(a, what, 3, {"reverse", "case_sensitive", "attribute"}, line);
    else check_args(a, what, 2, {"case_sensitive", "attribute"}, line);
    const Value* rev = srt ? arg(a, 0, "reverse") : nullptr;
    const Value* cs = arg(a, srt ? 1 : 0, "case_sensitive");
    const Value* attribute = arg(a, srt ? 2 : 1, "attribute");
    const bool sens = cs && truthy(*cs);
    if (srt) return Value::list(sorted(iterate(v, line), rev && truthy(*rev), sens, attribute, line));
    std::vector<Value> out, seen;
    for (const auto& x : iterate(v, line)) {
      Value k = attribute ? attr_path(x, *attribute, line) : x;
      if (!sens && k.t == Value::Str) k.s = map_case(k.s, false);
      bool dup = false;
      for (const auto& sv : seen) dup = dup || eq(sv, k, line);
      step(line, seen.size() / 16);
      if (!dup) {
        seen.push_back(k);
        out.push_back(x);
      }
    }
    return Value::list(std::move(out));
  }
  if (name == "sum") {
    check_args(a, what, 2, {"attribute", "start"}, line);
    const Value* attribute = arg(a, 0, "attribute");
    const Value* start = arg(a, 1, "start");
    Value acc = start ? *start : Value::integer(0);
    for (const auto& x : iterate(v, line)) acc = arith("+", acc, attribute ? attr_path(x, *attribute, line) : x, line);
    return acc;
  }
  if (name == "title") {
    check_args(a, what, 0, {}, line);
    // jinja2: each piece between runs of [-\s({\[<] is item[0].upper() + item[1:].lower()
    const std::u32string u = to_u32(s_of(v));
    std::u32string r;
    auto is_sep = [](char32_t c) { return c == '-' || py_space(c) || c == '(' || c == '{' || c == '[' || c == '<'; };
    for (size_t k = 0; k < u.size();) {
      size_t e = k;
      const bool sep = is_sep(u[k]);
      while (e < u.size() && is_sep(u[e]) == sep) ++e;
      if (sep) {
        r += u.substr(k, e - k);
      } else {
        r.push_back(uc_upper(u[k]));
        r += lower_u32(std::u32string_view(u).substr(k + 1, e - k - 1));
      }
      k = e;
    }
    return Value::str(to_u8(r));
  }
  if (name == "tojson") return tojson(v, a, line);
  if (name == "trim") {
    check_args(a, what, 1, {"chars"}, line);
    const Value* chars = arg(a, 0, "chars");
    if (chars && chars->t != Value::None) {
      if (chars->t != Value::Str) fail(line, what + ": chars must be a string");
      const std::u32string cs = to_u32(chars->s);
      return Value::str(py_strip(s_of(v), &cs, true, true));
    }
    return Value::str(py_strip(s_of(v), nullptr, true, true));
  }
  fail(line, "no filter named '" + name + "'");
}

bool Renderer::test(const std::string& name, const Value& v, const Args& a, int line) const {
  auto one_arg = [&]() -> const Value& {
    if (a.pos.size() != 1 || !a.kw.empty()) fail(line, detail::cat("test '", name, "' takes one argument"));
    return a.pos[0];
  };
  auto no_arg = [&]() {
    if (!a.pos.empty() || !a.kw.empty()) fail(line, detail::cat("test '", name, "' takes no argument"));
  };
  if (name == "defined") return no_arg(), v.t != Value::Undef;
  if (name == "undefined") return no_arg(), v.t == Value::Undef;
  if (name == "none") return no_arg(), v.t == Value::None;
  if (name == "boolean") return no_arg(), v.t == Value::Bool;
  if (name == "true") return no_arg(), v.t == Value::Bool && v.b;
  if (name == "false") return no_arg(), v.t == Value::Bool && !v.b;
  if (name == "integer") return no_arg(), v.t == Value::Int;
  if (name == "float") return no_arg(), v.t == Value::Float;
  if (name == "number") return no_arg(), v.is_num();
  if (name == "string") return no_arg(), v.t == Value::Str;
  if (name == "mapping") return no_arg(), v.t == Value::Dict && !v.d->ns;
  if (name == "iterable" || name == "sequence")
    return no_arg(), v.t == Value::Str || v.t == Value::List || v.t == Value::Undef || (v.t == Value::Dict && !v.d->ns);
  if (name == "callable") return no_arg(), v.t == Value::Fn;
  if (name == "lower" || name == "upper") {
    no_arg();
    bool any = false, all = true;
    for (char32_t c : to_u32(str(v, line))) {
      if (name == "lower") {
        all = all && !uc_is_upper(c);
        any = any || uc_is_lower(c);
      } else {
        all = all && !uc_is_lower(c);
        any = any || uc_is_upper(c);
      }
    }
    return all && any;
  }
  if (name == "even" || name == "odd" || name == "divisibleby") {
    if (!v.is_intlike()) {
      if (v.t == Value::Undef) undefined_error(v, line);
      fail(line, detail::cat("test '", name, "' needs an integer, got ", type_name(v)));
    }
    int64_t m = 2;
    if (name == "divisibleby") {
      const Value& d = one_arg();
      if (!d.is_intlike() || d.as_int() == 0) fail(line, "test 'divisibleby' needs a non-zero integer");
      m = d.as_int();
    } else {
      no_arg();
    }
    const int64_t r = m == -1 ? 0 : v.as_int() % m;
    return name == "odd" ? r != 0 : r == 0;
  }
  if (name == "sameas") {
    const Value& o = one_arg();
    if (v.t != o.t) return false;
    switch (v.t) {
      case Value::List: return v.l == o.l;
      case Value::Dict: return v.d == o.d;
      case Value::Fn: return v.fn == o.fn;
      default: return eq(v, o, line);
    }
  }
  if (name == "in") return contains(one_arg(), v, line);
  static const std::pair<const char*, const char*> cmp[] = {
      {"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="}, {"lt", "<"}, {"lessthan", "<"},
      {"<", "<"}, {"le", "<="}, {"<=", "<="}, {"gt", ">"}, {"greaterthan", ">"}, {">", ">"}, {"ge", ">="}, {">=", ">="}};
  for (const auto& c : cmp)
    if (name == c.first) return compare_op(c.second, v, one_arg(), line);
  fail(line, "no test named '" + name + "'");
}

std::tm local_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  return tm;
}

}  // namespace

// ---------------------------------------------------------------- public API

struct ChatTemplate::Impl {
  Body body;
  ChatTemplateLimits lim;
  std::function<std::tm()> clock = local_now;

  std::string render(Value vars) const {
    if (vars.t != Value::Dict) throw Error("chat template: the variables must be a JSON object");
    Renderer r(lim, clock);
    r.frames.emplace_back(std::move(vars.d->kv));
    r.frames.emplace_back();
    std::string out;
    r.exec(body, out);
    return out;
  }
};

ChatTemplate::ChatTemplate(const std::string& source, ChatTemplateLimits limits) : impl_(std::make_unique<Impl>()) {
  impl_->lim = limits;
  if (source.size() > limits.max_output)
    throw Error(detail::cat("chat template: the template is ", source.size(), " bytes, over the limit of ",
                            limits.max_output));
  Lexer lx(source);
  Parser ps(lx.run(), limits.max_depth);
  impl_->body = ps.parse();
}

ChatTemplate::~ChatTemplate() = default;

std::string ChatTemplate::render(const nlohmann::ordered_json& vars) const { return impl_->render(from_json(vars, 0)); }
std::string ChatTemplate::render(const nlohmann::json& vars) const { return impl_->render(from_json(vars, 0)); }

void ChatTemplate::set_clock(std::function<std::tm()> now) { impl_->clock = now ? std::move(now) : local_now; }

namespace {

std::string read_text_file(const std::filesystem::path& p) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(p, ec);
  if (ec) throw Error(detail::cat("chat template: cannot read ", p.string(), ": ", ec.message()));
  if (size > (uint64_t(64) << 20)) throw Error(detail::cat("chat template: ", p.string(), " is over 64 MiB"));
  std::FILE* f = std::fopen(p.c_str(), "rb");
  if (!f) throw Error(detail::cat("chat template: cannot open ", p.string()));
  std::string s(size_t(size), '\0');
  const size_t got = std::fread(s.data(), 1, s.size(), f);
  std::fclose(f);
  s.resize(got);
  return s;
}

// "chat_template": a string, or [{"name": ..., "template": ...}, ...].
std::string pick_template(const nlohmann::json& ct, const std::string& origin, bool with_tools) {
  if (ct.is_null()) return "";
  if (ct.is_string()) return ct.get<std::string>();
  HM_CHECK(ct.is_array(), origin, ": field 'chat_template' must be a string or a list of {name, template}, got ",
           ct.type_name());
  std::string def, tool;
  std::string names;
  for (size_t k = 0; k < ct.size(); ++k) {
    const auto& e = ct[k];
    HM_CHECK(e.is_object() && e.contains("name") && e["name"].is_string() && e.contains("template") &&
                 e["template"].is_string(),
             origin, ": chat_template[", k, "] must be {\"name\": STRING, \"template\": STRING}");
    const std::string nm = e["name"].get<std::string>();
    names += (names.empty() ? "" : ", ") + nm;
    if (nm == "default") def = e["template"].get<std::string>();
    if (nm == "tool_use") tool = e["template"].get<std::string>();
  }
  if (with_tools && !tool.empty()) return tool;
  HM_CHECK(!def.empty(), origin, ": chat_template lists templates (", names, ") but none named \"default\"");
  return def;
}

}  // namespace

HfChatTemplate read_chat_template(const std::string& model_dir, bool with_tools) {
  namespace fs = std::filesystem;
  HfChatTemplate t;
  std::error_code ec;
  const fs::path dir(model_dir);
  nlohmann::json cfg;
  const fs::path cfg_path = dir / "tokenizer_config.json";
  if (fs::is_regular_file(cfg_path, ec)) {
    cfg = parse_json_file(cfg_path.string());
    HM_CHECK(cfg.is_object(), cfg_path.string(), ": must be a JSON object");
    for (const char* k : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
      if (!cfg.contains(k)) continue;
      const auto& v = cfg[k];
      if (v.is_string()) t.special_tokens[k] = v;
      else if (v.is_object() && v.contains("content") && v["content"].is_string()) t.special_tokens[k] = v["content"];
      else HM_CHECK(v.is_null(), cfg_path.string(), ": field '", k, "' must be a string or {\"content\": STRING}");
    }
    if (cfg.contains("additional_special_tokens") && cfg["additional_special_tokens"].is_array()) {
      nlohmann::json list = nlohmann::json::array();
      for (const auto& v : cfg["additional_special_tokens"]) {
        if (v.is_string()) list.push_back(v);
        else if (v.is_object() && v.contains("content") && v["content"].is_string()) list.push_back(v["content"]);
      }
      t.special_tokens["additional_special_tokens"] = list;
    }
  }
  const fs::path jinja = dir / "chat_template.jinja";
  const fs::path json_file = dir / "chat_template.json";
  if (fs::is_regular_file(jinja, ec)) {
    t.source = read_text_file(jinja);
    t.origin = jinja.string();
  } else if (fs::is_regular_file(json_file, ec)) {
    const nlohmann::json j = parse_json_file(json_file.string());
    HM_CHECK(j.is_object() && j.contains("chat_template"), json_file.string(), ": must be an object with 'chat_template'");
    t.source = pick_template(j["chat_template"], json_file.string(), with_tools);
    t.origin = json_file.string();
  } else if (cfg.is_object() && cfg.contains("chat_template")) {
    t.source = pick_template(cfg["chat_template"], cfg_path.string(), with_tools);
    t.origin = cfg_path.string();
  }
  return t;
}

int copy_chat_template_files(const std::string& from_dir, const std::string& out_dir) {
  namespace fs = std::filesystem;
  int n = 0;
  std::error_code ec;
  for (const char* name : {"chat_template.jinja", "chat_template.json", "tokenizer_config.json",
                           "generation_config.json"}) {
    const fs::path src = fs::path(from_dir) / name;
    if (!fs::is_regular_file(src, ec)) continue;
    if (fs::equivalent(src, fs::path(out_dir) / name, ec)) continue;
    write_file_atomic((fs::path(out_dir) / name).string(), read_text_file(src));
    ++n;
  }
  return n;
}

namespace {
ChatTemplate compile(const HfChatTemplate& t, ChatTemplateLimits limits) {
  HM_CHECK(!t.source.empty(), "chat template: the template is empty");
  try {
    return ChatTemplate(t.source, limits);
  } catch (const Error& e) {
    if (t.origin.empty()) throw;
    throw Error(t.origin + ": " + e.what());
  }
}
}  // namespace

ChatFormat::ChatFormat(HfChatTemplate t, ChatTemplateLimits limits)
    : info_(std::move(t)), tmpl_(compile(info_, limits)) {}

std::string ChatFormat::apply(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                              const nlohmann::ordered_json& tools) const {
  nlohmann::ordered_json vars = nlohmann::ordered_json::object();
  if (info_.special_tokens.is_object())
    for (const auto& [k, v] : info_.special_tokens.items()) vars[k] = nlohmann::ordered_json(v);
  vars["messages"] = messages;
  vars["tools"] = tools;
  vars["documents"] = nullptr;
  vars["add_generation_prompt"] = add_generation_prompt;
  return tmpl_.render(vars);
}

std::string ChatFormat::apply(const nlohmann::json& messages, bool add_generation_prompt,
                              const nlohmann::json& tools) const {
  nlohmann::json vars = info_.special_tokens.is_object() ? info_.special_tokens : nlohmann::json::object();
  vars["messages"] = messages;
  vars["tools"] = tools;
  vars["documents"] = nullptr;
  vars["add_generation_prompt"] = add_generation_prompt;
  return tmpl_.render(vars);
}

}  // namespace hm
