// File names read from a model directory's own files (tokenizer.json's "model") must name files
// inside that directory: a checkpoint cannot make the engine read, say, /etc/shadow or ../x.
#pragma once
#include <string>

namespace hm {

// dir / name, after checking name: not empty, not absolute, no ".." component, and the path it
// resolves to (following symlinks, for the part that exists) lies inside dir's resolved path.
// hm::Error naming origin (the file name was read from) and field otherwise.
// allow_linked_files: a symlink whose target lies outside dir is accepted when that target is a
// regular file (a Hugging Face cache snapshot links each file into ../../blobs); the name itself
// must still be relative and free of "..".
std::string file_inside_dir(const std::string& dir, const std::string& name, const std::string& origin,
                            const std::string& field, bool allow_linked_files = false);

}  // namespace hm
