// defines: random_vector, randn — seeded test data; nmse — a result's normalised mean squared error against its
// reference. Plain C++ (no test framework, no CUDA), shared by the unit tests and the GPU tests (gpu_test_util.h).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace dsv3::test {

// n values of `dist` drawn with an mt19937_64 seeded with `seed`, as T
template <class T, class Dist>
std::vector<T> random_vector(size_t n, uint64_t seed, Dist dist) {
  std::mt19937_64 g(seed);
  std::vector<T> v(n);
  for (auto& x : v) x = (T)dist(g);
  return v;
}

inline std::vector<float> randn(size_t n, uint64_t seed, float sd = 1.0f) {
  return random_vector<float>(n, seed, std::normal_distribution<float>(0.0f, sd));
}

// sum (got - ref)^2 / sum ref^2
inline double nmse(const std::vector<float>& ref, const std::vector<float>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
    den += (double)ref[i] * ref[i];
  }
  return num / std::max(den, 1e-300);
}

}  // namespace dsv3::test
