// The non-interleaved 1F1B schedule and a discrete-event simulation of all stages together.
#include "pipeline/schedule.h"

#include <algorithm>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

namespace {

void check_shape(int stages, int stage, int microbatches) {
  DSV3_CHECK(stages >= 1, "pipeline stages=" << stages << " must be at least 1");
  DSV3_CHECK(stage >= 0 && stage < stages, "pipeline stage " << stage << " is outside 0.." << stages - 1);
  DSV3_CHECK(microbatches >= 1, "micro-batches=" << microbatches << " must be at least 1");
}

}  // namespace

int warmup_microbatches(int stages, int stage, int microbatches) {
  check_shape(stages, stage, microbatches);
  return std::min(stages - stage - 1, microbatches);
}

std::vector<Action> one_f_one_b(int stages, int stage, int microbatches) {
  const int warmup = warmup_microbatches(stages, stage, microbatches);
  const int steady = microbatches - warmup;
  const bool first = stage == 0, last = stage == stages - 1;
  auto forward = [&](int i) {
    Action a;
    a.op = Op::Forward;
    a.microbatch = i;
    a.recv_fwd = !first;
    a.send_fwd = !last;
    return a;
  };
  auto backward = [&](int i) {
    Action a;
    a.op = Op::Backward;
    a.microbatch = i;
    a.recv_bwd = !last;
    a.send_bwd = !first;
    return a;
  };

  std::vector<Action> out;
  out.reserve(2 * static_cast<size_t>(microbatches));
  int next_f = 0, next_b = 0;
  // 1. warmup: forwards only, filling the pipeline below this stage.
  for (int k = 0; k < warmup; ++k) out.push_back(forward(next_f++));
  // 2. steady state: one forward, then the backward of the oldest micro-batch still alive here.
  for (int k = 0; k < steady; ++k) {
    out.push_back(forward(next_f++));
    out.push_back(backward(next_b++));
  }
  // 3. cooldown: drain the backwards of the warmup's micro-batches.
  for (int k = 0; k < warmup; ++k) out.push_back(backward(next_b++));
  return out;
}

std::string format_schedule(const std::vector<Action>& actions) {
  std::ostringstream os;
  for (size_t k = 0; k < actions.size(); ++k)
    os << (k ? " " : "") << (actions[k].op == Op::Forward ? 'F' : 'B') << actions[k].microbatch;
  return os.str();
}

PipelineTimeline simulate_pipeline(const std::vector<std::vector<Action>>& schedules, double t_forward,
                                   double t_backward) {
  const int p = static_cast<int>(schedules.size());
  DSV3_CHECK(p >= 1, "pipeline simulation needs at least one stage");
  DSV3_CHECK(t_forward > 0 && t_backward > 0, "pipeline simulation needs positive step times");
  DSV3_CHECK(!schedules[0].empty() && schedules[0].size() % 2 == 0,
             "stage 0 has " << schedules[0].size() << " steps: a schedule is one F and one B per micro-batch");
  const int m = static_cast<int>(schedules[0].size()) / 2;

  // ---- every stage runs each micro-batch's F and B exactly once, with the transfers its position needs ----
  for (int s = 0; s < p; ++s) {
    const auto& list = schedules[s];
    DSV3_CHECK(static_cast<int>(list.size()) == 2 * m,
               "stage " << s << " has " << list.size() << " steps, stage 0 has " << 2 * m);
    std::vector<int> seen_f(m, 0), seen_b(m, 0);
    for (size_t k = 0; k < list.size(); ++k) {
      const Action& a = list[k];
      const bool fwd = a.op == Op::Forward;
      DSV3_CHECK(a.microbatch >= 0 && a.microbatch < m,
                 "stage " << s << " step " << k << " names micro-batch " << a.microbatch << " of " << m);
      int& seen = (fwd ? seen_f : seen_b)[a.microbatch];
      DSV3_CHECK(++seen == 1, "stage " << s << " step " << k << " runs " << (fwd ? 'F' : 'B') << a.microbatch
                                       << " twice");
      const bool ok = fwd ? (a.recv_fwd == (s > 0) && a.send_fwd == (s < p - 1) && !a.recv_bwd && !a.send_bwd)
                          : (a.recv_bwd == (s < p - 1) && a.send_bwd == (s > 0) && !a.recv_fwd && !a.send_fwd);
      DSV3_CHECK(ok, "stage " << s << " step " << k << " (" << (fwd ? 'F' : 'B') << a.microbatch
                              << ") has transfer flags that do not fit stage " << s << " of " << p);
    }
  }

  // ---- discrete-event run: repeatedly start every stage's next step whose inputs exist ----
  constexpr double kNotYet = -1;
  std::vector<std::vector<double>> f_end(p, std::vector<double>(m, kNotYet)), b_end = f_end;
  PipelineTimeline tl;
  tl.start.assign(p, {});
  std::vector<size_t> next(p, 0);
  std::vector<double> free_at(p, 0.0);
  size_t done = 0;
  const size_t total = static_cast<size_t>(p) * 2 * m;
  while (done < total) {
    bool progressed = false;
    for (int s = 0; s < p; ++s) {
      while (next[s] < schedules[s].size()) {
        const Action& a = schedules[s][next[s]];
        const int i = a.microbatch;
        double ready = free_at[s];
        if (a.op == Op::Forward) {
          if (s > 0) {
            if (f_end[s - 1][i] == kNotYet) break;
            ready = std::max(ready, f_end[s - 1][i]);
          }
        } else {
          if (f_end[s][i] == kNotYet) break;  // its own forward (the activations it differentiates)
          ready = std::max(ready, f_end[s][i]);
          if (s < p - 1) {
            if (b_end[s + 1][i] == kNotYet) break;
            ready = std::max(ready, b_end[s + 1][i]);
          }
        }
        const double end = ready + (a.op == Op::Forward ? t_forward : t_backward);
        (a.op == Op::Forward ? f_end : b_end)[s][i] = end;
        tl.start[s].push_back(ready);
        free_at[s] = end;
        tl.makespan = std::max(tl.makespan, end);
        ++next[s];
        ++done;
        progressed = true;
      }
    }
    if (!progressed) {
      std::ostringstream os;
      for (int s = 0; s < p; ++s) {
        if (next[s] >= schedules[s].size()) continue;
        const Action& a = schedules[s][next[s]];
        os << " stage " << s << " at " << (a.op == Op::Forward ? 'F' : 'B') << a.microbatch << ";";
      }
      DSV3_FAIL("pipeline schedule deadlocks:" << os.str());
    }
  }
  const double busy = static_cast<double>(m) * (t_forward + t_backward) * p;
  tl.bubble_fraction = 1.0 - busy / (p * tl.makespan);
  return tl;
}

PipelineTimeline simulate_1f1b(int stages, int microbatches, double t_forward, double t_backward) {
  check_shape(stages, 0, microbatches);
  std::vector<std::vector<Action>> schedules;
  for (int s = 0; s < stages; ++s) schedules.push_back(one_f_one_b(stages, s, microbatches));
  return simulate_pipeline(schedules, t_forward, t_backward);
}

}  // namespace dsv3
