#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <bit>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;
using hm::DType;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

void spit(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

uint64_t read_le64(const std::string& s) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(s[static_cast<size_t>(i)]);
  return n;
}

std::vector<float> random_floats(size_t n, uint64_t seed) {
  hm::Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) {
    x = static_cast<float>(rng.normal() * 3.0);
    if (x == 0.0f) x = 1.0f;  // tests must notice a reader that returns zeros
  }
  return v;
}

bool has_temp_files(const std::string& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
  return false;
}

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "hm_st_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return dir_ + "/" + name; }

  // Expects opening `path` to fail with an hm::Error carrying the standard prefix and `needle`.
  static void expect_open_error(const std::string& path, const std::string& needle) {
    try {
      hm::SafetensorsReader r(path);
      ADD_FAILURE() << "no error opening " << path << ", expected one mentioning: " << needle;
    } catch (const hm::Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind("safetensors: " + path + ":", 0), 0u) << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << "message: " << msg << "\nexpected to contain: " << needle;
    }
  }

  // A file with the given header text (unpadded) and data bytes.
  std::string raw(const std::string& name, const std::string& header, const std::string& data = "") {
    const std::string path = file(name);
    spit(path, le64(header.size()) + header + data);
    return path;
  }

  std::string dir_;
};

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const hm::Error& e) {
    return e.what();
  }
  return "<no hm::Error thrown>";
}

}  // namespace

// ---- conversions --------------------------------------------------------------------------------

TEST(SafetensorsConvert, F16Edges) {
  EXPECT_EQ(hm::f16_to_f32(0x0001), 0x1p-24f);  // smallest subnormal
  EXPECT_EQ(hm::f16_to_f32(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(hm::f16_to_f32(0x0400), 0x1p-14f);
  EXPECT_EQ(hm::f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(hm::f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(hm::f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(hm::f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(hm::f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(hm::f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(hm::f16_to_f32(0x7c01)));  // signalling NaN must not read as inf
  EXPECT_TRUE(std::signbit(hm::f16_to_f32(0x8000)));

  EXPECT_EQ(hm::f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(hm::f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(hm::f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(hm::f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(hm::f32_to_f16(65519.99f), 0x7bff);
  EXPECT_EQ(hm::f32_to_f16(65520.0f), 0x7c00);  // tie with odd 65504 goes to inf
  EXPECT_EQ(hm::f32_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(hm::f32_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(hm::f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  const uint16_t qnan = hm::f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(qnan & 0x7c00, 0x7c00);
  EXPECT_NE(qnan & 0x03ff, 0);
  // A NaN whose payload lives only in low bits must not collapse to inf.
  const uint16_t snan = hm::f32_to_f16(std::bit_cast<float>(0xff800001u));
  EXPECT_TRUE(std::isnan(hm::f16_to_f32(snan)));
  EXPECT_TRUE(std::signbit(hm::f16_to_f32(snan)));
  // Subnormals and ties to even.
  EXPECT_EQ(hm::f32_to_f16(0x1p-24f), 0x0001);
  EXPECT_EQ(hm::f32_to_f16(0x1p-25f), 0x0000);             // tie between 0 and 1 unit -> 0
  EXPECT_EQ(hm::f32_to_f16(-0x1p-25f), 0x8000);
  EXPECT_EQ(hm::f32_to_f16(0x1.000002p-25f), 0x0001);      // just above the tie
  EXPECT_EQ(hm::f32_to_f16(3 * 0x1p-25f), 0x0002);         // 1.5 units -> 2
  EXPECT_EQ(hm::f32_to_f16(5 * 0x1p-25f), 0x0002);         // 2.5 units -> 2
  EXPECT_EQ(hm::f32_to_f16(0x1p-14f - 0x1p-25f), 0x0400);  // largest tie rounds up into the normals
  EXPECT_EQ(hm::f32_to_f16(1.0f + 0x1p-11f), 0x3c00);      // tie, even stays
  EXPECT_EQ(hm::f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);  // tie, odd rounds up
  EXPECT_EQ(hm::f32_to_f16(std::bit_cast<float>(0x3f801001u)), 0x3c01);  // 1 + 2^-11 + 2^-23
  EXPECT_EQ(hm::f32_to_f16(1e-30f), 0x0000);
  EXPECT_EQ(hm::f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
}

TEST(SafetensorsConvert, F16ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = hm::f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      ASSERT_EQ(h & 0x7c00, 0x7c00u);
      ASSERT_TRUE(std::isnan(hm::f16_to_f32(hm::f32_to_f16(f)))) << h;
    } else {
      ASSERT_EQ(hm::f32_to_f16(f), h) << std::hex << h;
    }
  }
}

// For random floats, the chosen half/bf16 value must be the nearest representable one, ties to even.
TEST(SafetensorsConvert, NearestEvenOnRandomInputs) {
  hm::Rng rng(7);
  auto check = [](float x, uint16_t (*to)(float), float (*from)(uint16_t), const char* what) {
    const uint16_t h = to(x);
    const double got = from(h);
    const double err = std::fabs(got - x);
    for (int d : {-1, 1}) {
      const uint16_t n = static_cast<uint16_t>(h + d);
      const float nv = from(n);
      if (std::isnan(nv) || ((n ^ h) & 0x8000)) continue;  // walked off the sign or into NaN
      const double nerr = std::fabs(static_cast<double>(nv) - x);
      if (std::isinf(got)) continue;
      ASSERT_LE(err, nerr) << what << " x=" << x;
      if (err == nerr) {
        ASSERT_EQ(h & 1, 0) << what << " tie not to even, x=" << x;
      }
    }
  };
  for (int i = 0; i < 20000; ++i) {
    // Spread exponents over the half range including subnormals.
    const int exp2 = static_cast<int>(rng.uniform() * 44) - 28;
    const float x = static_cast<float>((rng.uniform() * 2 - 1) * std::ldexp(1.0, exp2));
    check(x, hm::f32_to_f16, hm::f16_to_f32, "f16");
    const float y = std::bit_cast<float>(static_cast<uint32_t>(rng.next_u64()));
    if (!std::isnan(y) && !std::isinf(y)) check(y, hm::f32_to_bf16, hm::bf16_to_f32, "bf16");
  }
}

TEST(SafetensorsConvert, BF16Edges) {
  EXPECT_EQ(hm::bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(hm::bf16_to_f32(0x0001), std::bit_cast<float>(0x00010000u));  // float subnormal kept
  EXPECT_EQ(hm::bf16_to_f32(0xff80), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(hm::f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(hm::f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(hm::f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);      // tie, even stays
  EXPECT_EQ(hm::f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(hm::f32_to_bf16(std::bit_cast<float>(0x3f808001u)), 0x3f81);  // 1 + 2^-8 + 2^-23
  EXPECT_EQ(hm::f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(hm::f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf, as RNE must
  EXPECT_EQ(hm::f32_to_bf16(std::bit_cast<float>(0x00018000u)), 0x0002);   // subnormal tie, odd rounds up
  // Truncating these NaNs would give inf; they must stay NaN with their sign.
  EXPECT_TRUE(std::isnan(hm::bf16_to_f32(hm::f32_to_bf16(std::bit_cast<float>(0x7f800001u)))));
  EXPECT_TRUE(std::isnan(hm::bf16_to_f32(hm::f32_to_bf16(std::bit_cast<float>(0x7fffffffu)))));
  const uint16_t neg_nan = hm::f32_to_bf16(std::bit_cast<float>(0xff800001u));
  EXPECT_TRUE(std::isnan(hm::bf16_to_f32(neg_nan)));
  EXPECT_EQ(neg_nan & 0x8000, 0x8000);
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = hm::bf16_to_f32(static_cast<uint16_t>(b));
    if (!std::isnan(f)) {
      ASSERT_EQ(hm::f32_to_bf16(f), b) << std::hex << b;
    }
  }
}

TEST(SafetensorsDType, NamesAndSizes) {
  EXPECT_STREQ(hm::dtype_name(DType::F32), "F32");
  EXPECT_STREQ(hm::dtype_name(DType::F8_E4M3), "F8_E4M3");
  EXPECT_EQ(hm::dtype_size(DType::BOOL), 1u);
  EXPECT_EQ(hm::dtype_size(DType::BF16), 2u);
  EXPECT_EQ(hm::dtype_size(DType::U32), 4u);
  EXPECT_EQ(hm::dtype_size(DType::I64), 8u);
  for (int i = 0; i <= static_cast<int>(DType::U64); ++i) {
    const auto d = static_cast<DType>(i);
    EXPECT_EQ(hm::dtype_from_name(hm::dtype_name(d)), d);
  }
  EXPECT_NE(error_of([] { hm::dtype_from_name("F17"); }).find("F17"), std::string::npos);
  EXPECT_THROW(hm::dtype_from_name("f32"), hm::Error);
}

// ---- round trips --------------------------------------------------------------------------------

namespace {
struct Case { std::string name; std::vector<int64_t> shape; std::vector<float> data; };
std::vector<Case> varied_cases() {
  std::vector<Case> cs = {
      {"blk.0.weight", {3, 5}, {}}, {"odd", {7}, {}},          {"scalar", {}, {}},
      {"empty", {0, 4}, {}},        {"empty2", {2, 0, 3}, {}}, {"deep", {1, 1, 1, 13}, {}},
      {"a", {1}, {}},
  };
  uint64_t seed = 1;
  for (auto& c : cs) {
    int64_t n = 1;
    for (auto d : c.shape) n *= d;
    c.data = random_floats(static_cast<size_t>(n), seed++);
  }
  return cs;
}
}  // namespace

class SafetensorsRoundTrip : public TempDirTest, public ::testing::WithParamInterface<DType> {};

TEST_P(SafetensorsRoundTrip, F32Source) {
  const DType dt = GetParam();
  const auto cs = varied_cases();
  std::vector<hm::F32Tensor> ts;
  for (const auto& c : cs) ts.push_back({c.name, c.shape, c.data.data()});
  const std::string path = file("m.safetensors");
  hm::write_safetensors_f32(path, ts, dt, {{"format", "pt"}});

  hm::SafetensorsReader r(path);
  EXPECT_EQ(r.path(), path);
  ASSERT_EQ(r.tensors().size(), cs.size());
  for (size_t i = 1; i < r.tensors().size(); ++i) EXPECT_LT(r.tensors()[i - 1].name, r.tensors()[i].name);
  EXPECT_EQ(r.metadata().at("format"), "pt");
  EXPECT_EQ(r.find("nope"), nullptr);
  EXPECT_EQ(r.find("blk.0"), nullptr);  // prefix of a name is not a match
  for (const auto& c : cs) {
    const hm::TensorInfo* t = r.find(c.name);
    ASSERT_NE(t, nullptr) << c.name;
    EXPECT_EQ(t->dtype, dt);
    EXPECT_EQ(t->shape, c.shape);
    EXPECT_EQ(t->numel(), static_cast<int64_t>(c.data.size()));
    std::vector<float> got(c.data.size() + 1, -7.0f);  // sentinel catches overruns
    r.read_f32(c.name, c.shape, got.data());
    EXPECT_EQ(got.back(), -7.0f) << c.name;
    for (size_t k = 0; k < c.data.size(); ++k) {
      const float want = dt == DType::F32   ? c.data[k]
                         : dt == DType::F16 ? hm::f16_to_f32(hm::f32_to_f16(c.data[k]))
                                            : hm::bf16_to_f32(hm::f32_to_bf16(c.data[k]));
      ASSERT_EQ(got[k], want) << c.name << "[" << k << "]";
      ASSERT_NEAR(got[k], c.data[k], std::fabs(c.data[k]) * (dt == DType::BF16 ? 4e-3 : 1e-3));
    }
  }
  EXPECT_EQ(r.find("scalar")->numel(), 1);
  EXPECT_EQ(r.find("empty")->numel(), 0);
  EXPECT_FALSE(has_temp_files(dir_));
}

INSTANTIATE_TEST_SUITE_P(Safetensors, SafetensorsRoundTrip, ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const ::testing::TestParamInfo<DType>& p) { return std::string(hm::dtype_name(p.param)); });

using SafetensorsIO = TempDirTest;

TEST_F(SafetensorsIO, RawDTypesAndF64) {
  const std::vector<int32_t> i32 = {1, -2, 3, 2147483647, -2147483647 - 1};
  const std::vector<uint8_t> u8 = {1, 2, 3, 250, 7};
  const std::vector<double> f64 = {1.5, -2.25, 1e300, 3.0000001};
  const std::vector<int64_t> i64 = {-1, 1LL << 40};
  std::vector<uint16_t> bf16;
  for (float f : random_floats(9, 3)) bf16.push_back(hm::f32_to_bf16(f));
  const std::string path = file("raw.safetensors");
  hm::write_safetensors(path, {{"i32", DType::I32, {5}, i32.data()},
                               {"u8", DType::U8, {5}, u8.data()},
                               {"f64", DType::F64, {2, 2}, f64.data()},
                               {"i64", DType::I64, {2}, i64.data()},
                               {"bf", DType::BF16, {3, 3}, bf16.data()}});
  hm::SafetensorsReader r(path);
  std::vector<int32_t> gi(5);
  r.read_raw(*r.find("i32"), gi.data());
  EXPECT_EQ(gi, i32);
  std::vector<uint8_t> gu(5);
  r.read_raw(*r.find("u8"), gu.data());
  EXPECT_EQ(gu, u8);
  std::vector<int64_t> g64(2);
  r.read_raw(*r.find("i64"), g64.data());
  EXPECT_EQ(g64, i64);

  std::vector<float> f(4);
  r.read_f32("f64", {2, 2}, f.data());
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(f[i], static_cast<float>(f64[i]));
  EXPECT_TRUE(std::isinf(f[2]));
  std::vector<float> b(9);
  r.read_f32("bf", {3, 3}, b.data());
  for (size_t i = 0; i < 9; ++i) EXPECT_EQ(b[i], hm::bf16_to_f32(bf16[i]));

  const std::string msg = error_of([&] { r.read_f32("i32", {5}, f.data()); });
  EXPECT_NE(msg.find("safetensors: " + path + ":"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'i32'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("I32"), std::string::npos) << msg;
}

TEST_F(SafetensorsIO, ChunkedConversionAcrossBufferBoundary) {
  // More than 1 MiB of F16 and of F64, so both writer and reader cross chunk boundaries.
  const size_t n = (1u << 19) + 3;
  const auto src = random_floats(n, 11);
  std::vector<double> dsrc(src.begin(), src.end());
  hm::write_safetensors_f32(file("h.safetensors"), {{"w", {static_cast<int64_t>(n)}, src.data()}}, DType::F16);
  hm::write_safetensors(file("d.safetensors"), {{"w", DType::F64, {static_cast<int64_t>(n)}, dsrc.data()}});
  std::vector<float> got(n);
  hm::SafetensorsReader(file("h.safetensors")).read_f32("w", {static_cast<int64_t>(n)}, got.data());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], hm::f16_to_f32(hm::f32_to_f16(src[i]))) << i;
  hm::SafetensorsReader(file("d.safetensors")).read_f32("w", {static_cast<int64_t>(n)}, got.data());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], src[i]) << i;
}

TEST_F(SafetensorsIO, HeaderPaddedAndDataAligned) {
  const std::vector<double> d = {1, 2, 3};
  const std::vector<float> f = {1, 2, 3};
  const std::vector<uint16_t> h = {1, 2, 3};
  const std::vector<uint8_t> b = {1, 2, 3};
  // Vary the name length so the unpadded header hits every remainder mod 8.
  for (int len = 1; len <= 8; ++len) {
    const std::string p = file("pad" + std::to_string(len));
    const std::string x(static_cast<size_t>(len), 'x');
    hm::write_safetensors(p, {{"u8" + x, DType::U8, {3}, b.data()},
                              {"f16", DType::F16, {3}, h.data()},
                              {"f64", DType::F64, {3}, d.data()},
                              {"b_f32", DType::F32, {3}, f.data()},
                              {"a_f32", DType::F32, {3}, f.data()}});
    const std::string bytes = slurp(p);
    const uint64_t n = read_le64(bytes);
    EXPECT_EQ(n % 8, 0u) << len;
    const std::string header = bytes.substr(8, n);
    const size_t last = header.find_last_not_of(' ');
    EXPECT_EQ(header[last], '}');
    EXPECT_LT(header.size() - last - 1, 8u);
    EXPECT_EQ(header.find("__metadata__"), std::string::npos);  // no metadata given, no key
    const auto j = nlohmann::json::parse(header);
    // Largest dtype first, then name.
    std::vector<std::pair<uint64_t, std::string>> order;
    for (auto& [k, v] : j.items()) {
      const uint64_t begin = v["data_offsets"][0];
      EXPECT_EQ(begin % hm::dtype_size(hm::dtype_from_name(v["dtype"].get<std::string>())), 0u) << k;
      order.emplace_back(begin, k);
    }
    std::sort(order.begin(), order.end());
    ASSERT_EQ(order.size(), 5u);
    EXPECT_EQ(order[0].second, "f64");
    EXPECT_EQ(order[1].second, "a_f32");
    EXPECT_EQ(order[2].second, "b_f32");
    EXPECT_EQ(order[3].second, "f16");
    EXPECT_EQ(order[4].second, "u8" + x);
    EXPECT_EQ(bytes.size(), 8 + n + 24 + 12 + 12 + 6 + 3);
    EXPECT_NO_THROW(hm::SafetensorsReader r(p));
  }
}

TEST_F(SafetensorsIO, MetadataRoundTripAndEmptyFile) {
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "quote \" and \xc3\xa9"}, {"empty", ""}};
  hm::write_safetensors(file("meta"), {}, meta);
  hm::SafetensorsReader r(file("meta"));
  EXPECT_EQ(r.metadata(), meta);
  EXPECT_TRUE(r.tensors().empty());
  EXPECT_NE(slurp(file("meta")).find("__metadata__"), std::string::npos);

  hm::write_safetensors(file("none"), {});
  EXPECT_EQ(slurp(file("none")), le64(8) + "{}      ");
  EXPECT_TRUE(hm::SafetensorsReader(file("none")).metadata().empty());
}

TEST_F(SafetensorsIO, WriterRefusesBadInput) {
  const std::vector<float> f(4, 1.0f);
  const std::string p = file("bad");
  hm::write_safetensors_f32(p, {{"keep", {4}, f.data()}}, DType::F32);
  const std::string before = slurp(p);
  auto expect = [&](auto&& fn, const std::string& needle) {
    const std::string msg = error_of(fn);
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(slurp(p), before);  // refused writes leave the old file alone
    EXPECT_FALSE(has_temp_files(dir_));
  };
  expect([&] { hm::write_safetensors_f32(p, {{"w", {2}, f.data()}, {"w", {2}, f.data()}}, DType::F32); },
         "duplicate tensor name 'w'");
  expect([&] { hm::write_safetensors_f32(p, {{"neg", {2, -2}, f.data()}}, DType::F16); }, "'neg'");
  expect([&] { hm::write_safetensors(p, {{"neg2", DType::F32, {-1}, f.data()}}); }, "negative shape [-1]");
  expect([&] { hm::write_safetensors(p, {{"huge", DType::F32, {1LL << 40, 1LL << 40}, f.data()}}); },
         "'huge'");
  expect([&] { hm::write_safetensors(p, {{"__metadata__", DType::F32, {1}, f.data()}}); }, "__metadata__");
  expect([&] { hm::write_safetensors(p, {{"", DType::F32, {1}, f.data()}}); }, "empty name");
  expect([&] { hm::write_safetensors(p, {{"null", DType::F32, {1}, nullptr}}); }, "'null'");
  expect([&] { hm::write_safetensors_f32(p, {{"w", {4}, f.data()}}, DType::I32); }, "I32");
  expect([&] { hm::write_safetensors(p, {{"bad\xff", DType::F32, {1}, f.data()}}); }, "UTF-8");
  // A null pointer is fine for a tensor with no elements.
  EXPECT_NO_THROW(hm::write_safetensors(file("z"), {{"z", DType::F32, {0}, nullptr}}));
}

// ---- malformed files ----------------------------------------------------------------------------

using SafetensorsMalformed = TempDirTest;

TEST_F(SafetensorsMalformed, TruncatedAtSeveralPoints) {
  const auto a = random_floats(6, 5);
  const auto b = random_floats(3, 6);
  const std::string good = file("good");
  hm::write_safetensors_f32(good, {{"a", {2, 3}, a.data()}, {"b", {3}, b.data()}}, DType::F32);
  const std::string bytes = slurp(good);
  const uint64_t n = read_le64(bytes);
  struct Cut { size_t at; std::string needle; };
  const std::vector<Cut> cuts = {
      {0, "too short"},
      {3, "too short"},
      {7, "too short"},
      {8, "runs past the end of the file"},
      {8 + n / 2, "runs past the end of the file"},
      {8 + n - 1, "runs past the end of the file"},
      {8 + n, "past the end of the data buffer"},
      {8 + n + 5, "past the end of the data buffer"},
      {bytes.size() - 1, "past the end of the data buffer"},
  };
  for (const auto& c : cuts) {
    const std::string p = file("cut" + std::to_string(c.at));
    spit(p, bytes.substr(0, c.at));
    SCOPED_TRACE(c.at);
    expect_open_error(p, c.needle);
  }
  // The last cut loses one byte of the last tensor, which must be the one named.
  expect_open_error(file("cut" + std::to_string(bytes.size() - 1)), "tensor 'b'");
}

TEST_F(SafetensorsMalformed, HeaderLength) {
  const std::string p = file("len");
  spit(p, le64(1000) + "{}");
  expect_open_error(p, "header length 1000 runs past the end of the file");
  spit(p, le64(100'000'001) + "{}");
  expect_open_error(p, "header length 100000001 exceeds the limit");
  spit(p, le64(~0ull) + "{}");
  expect_open_error(p, "exceeds the limit");
  spit(p, le64(1ull << 63) + "{}");
  expect_open_error(p, "exceeds the limit");
}

TEST_F(SafetensorsMalformed, HeaderNotAJsonObject) {
  expect_open_error(raw("j1", "{\"a\": "), "header: invalid JSON");
  expect_open_error(raw("j2", "{\"a\":{}} trailing"), "header: invalid JSON");
  expect_open_error(raw("j3", ""), "header: invalid JSON");
  expect_open_error(raw("j4", std::string("{\"a\0\":1}", 8)), "header: invalid JSON");
  expect_open_error(raw("j5", "{\"\xff\": {}}"), "header: invalid JSON");  // not UTF-8
  expect_open_error(raw("arr", "[1, 2]"), "not a JSON object");
  expect_open_error(raw("num", "42"), "not a JSON object");
  expect_open_error(raw("dup",
                        R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                        R"("w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
                        "x"),
                    "field 'w' appears twice");
  // Nesting is bounded (parse_json): deep arrays anywhere are refused, not recursed into.
  expect_open_error(raw("deep", "{\"__metadata__\": {\"a\": " + std::string(100000, '[') + "}}"),
                    "nests deeper than");
  // A key repeated inside one tensor's entry is caught too, not just at the top level.
  expect_open_error(raw("dup2", R"({"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}})", "x"),
                    "field 'dtype' appears twice");
}

TEST_F(SafetensorsMalformed, BadEntries) {
  const std::string d8(8, 'x');
  struct Bad { std::string header; std::string needle; };
  const std::vector<Bad> bads = {
      {R"({"w": 5})", "tensor 'w': entry is not an object"},
      {R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", "tensor 'w': missing dtype"},
      {R"({"w": {"dtype": "F32", "data_offsets": [0, 8]}})", "tensor 'w': missing shape"},
      {R"({"w": {"dtype": "F32", "shape": [2]}})", "tensor 'w': missing data_offsets"},
      {R"({"w": {"dtype": 3, "shape": [2], "data_offsets": [0, 8]}})", "tensor 'w': dtype is not a string"},
      {R"({"w": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}})", "tensor 'w': unknown dtype 'F17'"},
      {R"({"w": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}})", "unknown dtype 'f32'"},
      {R"({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}})", "tensor 'w': shape is not an array"},
      {R"({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}})", "tensor 'w': shape[1] is negative"},
      {R"({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})", "tensor 'w': shape[0] is not an integer"},
      {R"({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}})", "shape[0] is not an integer"},
      {R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904], "data_offsets": [0, 8]}})",
       "tensor 'w': shape [4611686018427387904, 4611686018427387904] is too large"},
      {R"({"w": {"dtype": "F32", "shape": [9223372036854775808], "data_offsets": [0, 8]}})",
       "shape[0] is too large"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", "tensor 'w': data_offsets is not [begin, end]"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": {"a": 1}}})", "data_offsets is not [begin, end]"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})",
       "tensor 'w': data_offsets begin is negative"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.5]}})", "data_offsets end is not an integer"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", "tensor 'w': data_offsets begin 8 > end 0"},
      {R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})",
       "tensor 'w': data_offsets span 8 bytes but shape [3] of F32 needs 12"},
      {R"({"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}})", "needs 16"},
      {R"({"w": {"dtype": "F32", "shape": [], "data_offsets": [0, 8]}})", "shape [] of F32 needs 4"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", "tensor 'w': data_offsets end 16 is past"},
      {R"({"__metadata__": [1], "w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})",
       "__metadata__ is not an object"},
      {R"({"__metadata__": {"k": 1}, "w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})",
       "__metadata__ value of 'k' is not a string"},
  };
  for (size_t i = 0; i < bads.size(); ++i) {
    SCOPED_TRACE(bads[i].header);
    expect_open_error(raw("bad" + std::to_string(i), bads[i].header, d8), bads[i].needle);
  }
}

TEST_F(SafetensorsMalformed, CoverageGapsOverlapsTrailing) {
  const std::string d12(12, 'x');
  expect_open_error(raw("gap", R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                   "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}})", d12),
                    "gap in data buffer: bytes [4, 8) before tensor 'b'");
  expect_open_error(raw("gap0", R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}})", d12),
                    "bytes [0, 8) before tensor 'a'");
  expect_open_error(raw("over", R"({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                                    "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}})", d12),
                    "tensor 'b' [4, 12) overlaps tensor 'a' [0, 8)");
  expect_open_error(raw("same", R"({"a": {"dtype": "U8", "shape": [12], "data_offsets": [0, 12]},
                                    "b": {"dtype": "U8", "shape": [12], "data_offsets": [0, 12]}})", d12),
                    "tensor 'b' [0, 12) overlaps tensor 'a' [0, 12)");
  // An empty tensor placed inside another one is still an overlap.
  expect_open_error(raw("inside", R"({"a": {"dtype": "U8", "shape": [12], "data_offsets": [0, 12]},
                                      "e": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}})", d12),
                    "tensor 'e' [4, 4) overlaps tensor 'a'");
  expect_open_error(raw("trail", R"({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})", d12),
                    "4 trailing bytes after the last tensor 'a'");
  expect_open_error(raw("trail0", R"({})", d12), "12 trailing bytes");
}

TEST_F(SafetensorsMalformed, AcceptsEdgeCasesOfValidFiles) {
  // Empty tensors sharing an offset, at the start and at the end; whitespace around the JSON.
  const std::string p = raw("ok", R"(  {"e1": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
      "e2": {"dtype": "BF16", "shape": [5, 0], "data_offsets": [0, 0]},
      "s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
      "e3": {"dtype": "F64", "shape": [0], "data_offsets": [4, 4]}}     )",
                            std::string("\x00\x00\xc0\x3f", 4));
  hm::SafetensorsReader r(p);
  ASSERT_EQ(r.tensors().size(), 4u);
  float v = 0;
  r.read_f32("s", {}, &v);
  EXPECT_EQ(v, 1.5f);
  r.read_f32("e3", {0}, nullptr);
  r.read_f32("e2", {5, 0}, nullptr);
  EXPECT_EQ(r.find("e1")->numel(), 0);
  // An empty header with no data is a valid, empty checkpoint.
  EXPECT_NO_THROW(hm::SafetensorsReader(raw("empty", "{}")));
}

TEST_F(SafetensorsMalformed, NotAFile) {
  expect_open_error(file("does-not-exist"), "cannot open");
  expect_open_error(dir_, "not a regular file");
}

TEST_F(SafetensorsMalformed, ReadF32WrongShapeOrMissing) {
  const auto a = random_floats(32, 9);
  const std::string p = file("m");
  hm::write_safetensors_f32(p, {{"w", {8, 4}, a.data()}}, DType::F16);
  hm::SafetensorsReader r(p);
  std::vector<float> dst(32);
  std::string msg = error_of([&] { r.read_f32("w", {4, 8}, dst.data()); });
  EXPECT_EQ(msg.rfind("safetensors: " + p + ":", 0), 0u) << msg;
  EXPECT_NE(msg.find("'w'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected [4, 8], file has [8, 4]"), std::string::npos) << msg;
  msg = error_of([&] { r.read_f32("w", {32}, dst.data()); });
  EXPECT_NE(msg.find("expected [32], file has [8, 4]"), std::string::npos) << msg;
  msg = error_of([&] { r.read_f32("missing.weight", {8, 4}, dst.data()); });
  EXPECT_EQ(msg.rfind("safetensors: " + p + ":", 0), 0u) << msg;
  EXPECT_NE(msg.find("'missing.weight' not found"), std::string::npos) << msg;
}

TEST_F(SafetensorsMalformed, FileShrunkAfterOpen) {
  const auto a = random_floats(16, 2);
  const std::string p = file("m");
  hm::write_safetensors_f32(p, {{"w", {16}, a.data()}}, DType::F32);
  hm::SafetensorsReader r(p);
  fs::resize_file(p, fs::file_size(p) - 4);
  std::vector<float> dst(16);
  const std::string msg = error_of([&] { r.read_f32("w", {16}, dst.data()); });
  EXPECT_NE(msg.find("tensor 'w': unexpected end of file"), std::string::npos) << msg;
}

// ---- AtomicFile ---------------------------------------------------------------------------------

using AtomicFileTest = TempDirTest;

TEST_F(AtomicFileTest, WritesAndReplaces) {
  const std::string p = file("f.txt");
  hm::write_file_atomic(p, "first");
  EXPECT_EQ(slurp(p), "first");
  hm::write_file_atomic(p, "second, longer");
  EXPECT_EQ(slurp(p), "second, longer");
  hm::write_file_atomic(p, "");
  EXPECT_EQ(slurp(p), "");
  EXPECT_FALSE(has_temp_files(dir_));
}

TEST_F(AtomicFileTest, ThrowBeforeCommitKeepsOldFile) {
  const std::string p = file("f.txt");
  hm::write_file_atomic(p, "old content");
  try {
    hm::AtomicFile f(p);
    f.write("new", 3);
    EXPECT_TRUE(has_temp_files(dir_));  // the temp exists while writing
    throw hm::Error("simulated failure");
  } catch (const hm::Error&) {
  }
  EXPECT_EQ(slurp(p), "old content");
  EXPECT_FALSE(has_temp_files(dir_));
  // Never committed, never existed: the target is not created.
  { hm::AtomicFile f(file("g.txt")); f.write("x", 1); }
  EXPECT_FALSE(fs::exists(file("g.txt")));
  EXPECT_FALSE(has_temp_files(dir_));
}

TEST_F(AtomicFileTest, FailedWriteKeepsOldFileAndRefusesCommit) {
  const std::string p = file("f.txt");
  hm::write_file_atomic(p, "old content");
  // Make write() fail for real: a file size limit turns large writes into EFBIG.
  struct rlimit old_lim;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_lim), 0);
  auto old_sig = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old_lim;
  lim.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  std::string msg1, msg2;
  {
    hm::AtomicFile f(p);
    const std::string big(10000, 'n');
    msg1 = error_of([&] { f.write(big.data(), big.size()); });
    msg2 = error_of([&] { f.commit(); });
  }
  ::setrlimit(RLIMIT_FSIZE, &old_lim);
  std::signal(SIGXFSZ, old_sig);
  EXPECT_NE(msg1.find(p), std::string::npos) << msg1;
  EXPECT_NE(msg1.find(std::strerror(EFBIG)), std::string::npos) << msg1;
  EXPECT_NE(msg2.find("failed write"), std::string::npos) << msg2;
  EXPECT_EQ(slurp(p), "old content");
  EXPECT_FALSE(has_temp_files(dir_));
}

TEST_F(AtomicFileTest, MissingDirectoryNamesPathAndReason) {
  const std::string p = file("no/such/dir/f.txt");
  const std::string msg = error_of([&] { hm::write_file_atomic(p, "x"); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::strerror(ENOENT)), std::string::npos) << msg;
}

TEST_F(AtomicFileTest, ModeLikeAPlainCreateOrKeptFromTheOldFile) {
  const std::string p = file("f.txt");
  struct UmaskGuard {
    mode_t old = ::umask(022);
    ~UmaskGuard() { ::umask(old); }
  } guard;
  hm::write_file_atomic(p, "x");
  struct stat st;
  ASSERT_EQ(::stat(p.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);  // not mkstemp's 0600
  ASSERT_EQ(::chmod(p.c_str(), 0640), 0);
  hm::write_file_atomic(p, "y");
  ASSERT_EQ(::stat(p.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
}
