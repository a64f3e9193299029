#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/config.h"

using namespace hm;
using nlohmann::json;

namespace {
// The message of the hm::Error that parsing j throws, or "" when it parses.
std::string error_of(const json& j) {
  try {
    config_from_json(j);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
json base() { return config_to_json(preset("tiny")); }
}  // namespace

TEST(Config, PresetsAreValidAndRoundTrip) {
  for (const auto& name : preset_names()) {
    const ModelConfig c = preset(name);
    EXPECT_NO_THROW(validate(c)) << name;
    const ModelConfig back = config_from_json(config_to_json(c));
    EXPECT_EQ(config_to_json(back), config_to_json(c)) << name;
  }
}

TEST(Config, SeedPresetIsTheSeedModel) {
  const ModelConfig c = preset("seed");
  EXPECT_EQ(c.d_model, 512);
  EXPECT_EQ(c.n_layers, 12);
  EXPECT_EQ(c.attention_layers, (std::vector<int>{3, 6, 9}));
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.d_state, 16);
  EXPECT_EQ(c.d_conv, 4);
  EXPECT_EQ(c.expand, 2);
  EXPECT_EQ(c.resolved_dt_rank(), 32);
}

TEST(Config, BaselinesMatchSeedParameterCount) {
  const double seed = double(count_params(preset("seed")));
  for (const char* name : {"mamba", "transformer"}) {
    const ModelConfig c = preset(name);
    EXPECT_NEAR(double(count_params(c)) / seed, 1.0, 0.05) << name << " has " << count_params(c);
  }
  EXPECT_TRUE(preset("mamba").attention_layers.empty());
  const ModelConfig t = preset("transformer");
  EXPECT_EQ(int(t.attention_layers.size()), t.n_layers);
}

TEST(Config, DtRankAuto) {
  json j = base();
  j["d_model"] = 100;
  j["n_heads"] = 2;  // head_dim 50: RoPE needs it even
  j["n_kv_heads"] = 2;
  j["dt_rank"] = "auto";
  EXPECT_EQ(config_from_json(j).resolved_dt_rank(), 7);  // ceil(100/16)
  j["dt_rank"] = 5;
  EXPECT_EQ(config_from_json(j).resolved_dt_rank(), 5);
}

TEST(Config, RejectionsNameTheField) {
  struct Case { const char* field; json value; const char* expect; };
  const std::vector<Case> cases = {
      {"attention_layers", json::array({1, 4}), "attention_layers"},   // 4 >= n_layers
      {"attention_layers", json::array({-1}), "attention_layers"},
      {"attention_layers", json::array({1, 1}), "twice"},
      {"attention_layers", "1,3", "attention_layers"},
      {"d_model", 30, "n_heads"},                                      // 30 % 4 != 0
      {"d_model", 0, "d_model"},
      {"d_model", -5, "d_model"},
      {"d_model", 32.5, "d_model"},
      {"d_model", "32", "d_model"},
      {"n_layers", 0, "n_layers"},
      {"vocab_size", 0, "vocab_size"},
      {"d_state", -1, "d_state"},
      {"d_conv", 0, "d_conv"},
      {"expand", 0, "expand"},
      {"dt_rank", "big", "dt_rank"},
      {"dt_rank", 0, "dt_rank"},
      {"n_kv_heads", 3, "n_kv_heads"},                                 // 4 % 3 != 0
      {"n_heads", 0, "n_heads"},
      {"rope", "yes", "rope"},
      {"rope_theta", -1.0, "rope_theta"},
      {"d_ff", -1, "d_ff"},
      {"norm_eps", 0.0, "norm_eps"},
      {"tie_embeddings", 1, "tie_embeddings"},
      {"state_bridges", "true", "state_bridges"},
      {"hybrid", "weird", "hybrid"},
      {"model_type", "llama", "model_type"},
  };
  for (const auto& c : cases) {
    json j = base();
    j[c.field] = c.value;
    const std::string msg = error_of(j);
    EXPECT_NE(msg.find(c.expect), std::string::npos)
        << c.field << "=" << c.value.dump() << " gave: '" << msg << "'";
  }
}

TEST(Config, UnknownFieldIsReported) {
  json j = base();
  j["d_modle"] = 64;
  EXPECT_NE(error_of(j).find("unknown field 'd_modle'"), std::string::npos);
}

TEST(Config, MissingRequiredField) {
  json j = base();
  j.erase("vocab_size");
  EXPECT_NE(error_of(j).find("vocab_size"), std::string::npos);
  EXPECT_NE(error_of(json::array()).find("object"), std::string::npos);
}

TEST(Config, FileErrorsNameThePath) {
  const auto dir = std::filesystem::temp_directory_path() / "hm_config_test";
  std::filesystem::create_directories(dir);
  const auto path = (dir / "config.json").string();
  std::ofstream(path) << "{\"d_model\": 32,";  // truncated JSON
  try {
    load_config(path);
    FAIL() << "truncated config accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
  }
  save_config(path, preset("tiny"));
  EXPECT_EQ(config_to_json(load_config(path)), config_to_json(preset("tiny")));
  EXPECT_THROW(load_config((dir / "absent.json").string()), Error);
  std::filesystem::remove_all(dir);
}

TEST(Config, BridgesSitAtTypeChanges) {
  ModelConfig c = preset("seed");  // attention at 3, 6, 9
  std::vector<int> bridges;
  for (int i = 0; i < c.n_layers; ++i)
    if (c.has_bridge(i)) bridges.push_back(i);
  EXPECT_EQ(bridges, (std::vector<int>{3, 4, 6, 7, 9, 10}));
  c.state_bridges = false;
  for (int i = 0; i < c.n_layers; ++i) EXPECT_FALSE(c.has_bridge(i));
}
