// Unit tests of the 1F1B schedule (pipeline/schedule.h): the lists of a worked example, the counts and order
// rules for every stage of many pipelines, the transfer flags, and the all-stage simulation (no deadlock,
// bubble (p-1)/(m+p-1)), plus the simulation's detection of broken schedules.
#include "test_util.h"
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "pipeline/schedule.h"

using dsv3::Action;
using dsv3::Op;

using dsv3::test::error_of;

namespace {

std::vector<std::vector<Action>> all_stages(int p, int m) {
  std::vector<std::vector<Action>> s;
  for (int k = 0; k < p; ++k) s.push_back(dsv3::one_f_one_b(p, k, m));
  return s;
}

// Stage s of p running the steps of `text` ("F0 B0 F1 B1"), with the transfer flags of its position.
std::vector<Action> steps(int p, int s, const std::string& text) {
  std::vector<Action> out;
  for (size_t k = 0; k < text.size(); ++k) {
    if (text[k] != 'F' && text[k] != 'B') continue;
    Action a;
    a.op = text[k] == 'F' ? Op::Forward : Op::Backward;
    a.microbatch = std::stoi(text.substr(k + 1));
    if (a.op == Op::Forward) a.recv_fwd = s > 0, a.send_fwd = s < p - 1;
    else a.recv_bwd = s < p - 1, a.send_bwd = s > 0;
    out.push_back(a);
  }
  return out;
}

}  // namespace

// The example of schedule.h: 4 stages, 6 micro-batches.
TEST(PipelineSchedule, WorkedExample) {
  EXPECT_EQ(dsv3::format_schedule(dsv3::one_f_one_b(4, 0, 6)), "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5");
  EXPECT_EQ(dsv3::format_schedule(dsv3::one_f_one_b(4, 1, 6)), "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5");
  EXPECT_EQ(dsv3::format_schedule(dsv3::one_f_one_b(4, 2, 6)), "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5");
  EXPECT_EQ(dsv3::format_schedule(dsv3::one_f_one_b(4, 3, 6)), "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5");
  // fewer micro-batches than the warmup wants: all forwards, then all backwards (GPipe-like)
  EXPECT_EQ(dsv3::format_schedule(dsv3::one_f_one_b(4, 0, 2)), "F0 F1 B0 B1");
  EXPECT_EQ(dsv3::format_schedule(dsv3::one_f_one_b(1, 0, 3)), "F0 B0 F1 B1 F2 B2");
  EXPECT_EQ(dsv3::warmup_microbatches(4, 0, 6), 3);
  EXPECT_EQ(dsv3::warmup_microbatches(4, 3, 6), 0);
  EXPECT_EQ(dsv3::warmup_microbatches(8, 0, 2), 2);
}

TEST(PipelineSchedule, CountsOrderAndWarmupForManyPipelines) {
  for (int p = 1; p <= 8; ++p)
    for (int m = 1; m <= 16; ++m)
      for (int s = 0; s < p; ++s) {
        SCOPED_TRACE("p " + std::to_string(p) + " m " + std::to_string(m) + " stage " + std::to_string(s));
        const auto list = dsv3::one_f_one_b(p, s, m);
        ASSERT_EQ(list.size(), 2u * m);
        const int warmup = std::min(p - s - 1, m);
        EXPECT_EQ(dsv3::warmup_microbatches(p, s, m), warmup);
        std::vector<int> f_at(m, -1), b_at(m, -1);
        int next_f = 0, next_b = 0, alive = 0, max_alive = 0, leading_f = 0;
        bool seen_b = false;
        for (int k = 0; k < 2 * m; ++k) {
          const Action& a = list[k];
          if (a.op == Op::Forward) {
            ASSERT_EQ(a.microbatch, next_f++) << "forwards run in micro-batch order";
            f_at[a.microbatch] = k;
            max_alive = std::max(max_alive, ++alive);
            if (!seen_b) ++leading_f;
          } else {
            ASSERT_EQ(a.microbatch, next_b++) << "backwards run in micro-batch order";
            ASSERT_GE(f_at[a.microbatch], 0) << "B" << a.microbatch << " before its F";
            b_at[a.microbatch] = k;
            --alive;
            seen_b = true;
          }
        }
        ASSERT_EQ(next_f, m);  // every micro-batch F and B exactly once (in order, so no repeats)
        ASSERT_EQ(next_b, m);
        for (int i = 0; i < m; ++i) ASSERT_LT(f_at[i], b_at[i]);
        // warmup forwards, plus the first steady-state forward when there is a steady state
        EXPECT_EQ(leading_f, warmup + (m > warmup ? 1 : 0));
        // 1F1B's memory bound: at most p - s micro-batches' activations alive (GPipe would hold m)
        EXPECT_EQ(max_alive, std::min(p - s, m));
        // steady state strictly alternates F, B after the warmup
        for (int k = warmup; k < warmup + 2 * (m - warmup); ++k)
          EXPECT_EQ(list[k].op, (k - warmup) % 2 == 0 ? Op::Forward : Op::Backward) << k;
      }
}

TEST(PipelineSchedule, TransferFlagsFollowTheStagePosition) {
  for (int p = 1; p <= 5; ++p)
    for (int s = 0; s < p; ++s)
      for (const Action& a : dsv3::one_f_one_b(p, s, 7)) {
        const bool first = s == 0, last = s == p - 1;
        if (a.op == Op::Forward) {
          EXPECT_EQ(a.recv_fwd, !first);  // the first stage reads tokens
          EXPECT_EQ(a.send_fwd, !last);   // the last stage computes the loss
          EXPECT_FALSE(a.recv_bwd || a.send_bwd);
        } else {
          EXPECT_EQ(a.recv_bwd, !last);
          EXPECT_EQ(a.send_bwd, !first);
          EXPECT_FALSE(a.recv_fwd || a.send_fwd);
        }
      }
  // the messages of each link pair up in order: stage s's sends are stage s+1's receives, micro-batch by micro-batch
  const auto st = all_stages(4, 9);
  for (int s = 0; s + 1 < 4; ++s) {
    std::vector<int> sent_f, recv_f, sent_b, recv_b;
    for (const Action& a : st[s]) {
      if (a.send_fwd) sent_f.push_back(a.microbatch);
      if (a.recv_bwd) recv_b.push_back(a.microbatch);
    }
    for (const Action& a : st[s + 1]) {
      if (a.recv_fwd) recv_f.push_back(a.microbatch);
      if (a.send_bwd) sent_b.push_back(a.microbatch);
    }
    EXPECT_EQ(sent_f, recv_f);
    EXPECT_EQ(sent_b, recv_b);
    EXPECT_EQ(sent_f.size(), 9u);
  }
}

// Every pipeline of 1..8 stages and 1..16 micro-batches runs to the end, with the 1F1B bubble.
TEST(PipelineSchedule, SimulationHasNoDeadlockAndTheExpectedBubble) {
  for (const auto& [tf, tb] : {std::pair{1.0, 2.0}, std::pair{1.0, 1.0}, std::pair{0.5, 1.5}})
    for (int p = 1; p <= 8; ++p)
      for (int m = 1; m <= 16; ++m) {
        SCOPED_TRACE("p " + std::to_string(p) + " m " + std::to_string(m) + " tf " + std::to_string(tf));
        dsv3::PipelineTimeline tl;
        ASSERT_NO_THROW(tl = dsv3::simulate_1f1b(p, m, tf, tb));
        EXPECT_NEAR(tl.makespan, (m + p - 1) * (tf + tb), 1e-9);
        EXPECT_NEAR(tl.bubble_fraction, double(p - 1) / (m + p - 1), 1e-12);
        ASSERT_EQ(tl.start.size(), static_cast<size_t>(p));
        for (int s = 0; s < p; ++s) {
          ASSERT_EQ(tl.start[s].size(), 2u * m);
          for (size_t k = 1; k < tl.start[s].size(); ++k) EXPECT_GE(tl.start[s][k], tl.start[s][k - 1]);
        }
      }
  // the first forward of stage s starts after s forwards; the last stage starts its first backward at once
  const auto tl = dsv3::simulate_1f1b(4, 8, 1.0, 2.0);
  for (int s = 0; s < 4; ++s) EXPECT_DOUBLE_EQ(tl.start[s][0], s);
  EXPECT_DOUBLE_EQ(tl.start[3][1], 4.0);
}

TEST(PipelineSchedule, SimulationRejectsBrokenSchedules) {
  // stage 0 skips its warmup and stage 1 takes the micro-batches in the other order: stage 0's B0 waits for
  // stage 1's B0, behind its F1, which waits for stage 0's F1, behind B0
  std::vector<std::vector<Action>> st = {steps(2, 0, "F0 B0 F1 B1"), steps(2, 1, "F1 B1 F0 B0")};
  EXPECT_TRUE(dsv3::simulate_pipeline({steps(2, 0, "F0 B0 F1 B1"), steps(2, 1, "F0 B0 F1 B1")}).makespan > 0);
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "pipeline schedule deadlocks: stage 0 at B0; stage 1 at F1;");

  st = all_stages(2, 2);
  std::swap(st[0][0], st[0][2]);  // stage 0: B0 F1 F0 B1: B0 before its own forward
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "deadlocks: stage 0 at B0");

  st = all_stages(3, 2);
  st[1][1].microbatch = 0;  // F0 twice, no F1
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "stage 1 step 1 runs F0 twice");
  st = all_stages(3, 2);
  st[2][0].microbatch = 5;
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "stage 2 step 0 names micro-batch 5 of 2");
  st = all_stages(3, 2);
  st[2].pop_back();
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "stage 2 has 3 steps, stage 0 has 4");
  st = all_stages(3, 2);
  st[0].pop_back();
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "stage 0 has 3 steps");
  st = all_stages(3, 2);
  st[0][0].recv_fwd = true;  // the first stage has nobody to receive from
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "stage 0 step 0 (F0) has transfer flags that do not fit stage 0 of 3");
  st = all_stages(3, 2);
  st[2].back().recv_bwd = true;
  EXPECT_ERROR(dsv3::simulate_pipeline(st), "stage 2 step 3 (B1) has transfer flags");
  EXPECT_ERROR(dsv3::simulate_pipeline({}), "at least one stage");
  EXPECT_ERROR(dsv3::simulate_pipeline(all_stages(2, 2), 0.0, 1.0), "positive step times");
}

TEST(PipelineSchedule, BadArguments) {
  EXPECT_ERROR(dsv3::one_f_one_b(0, 0, 4), "pipeline stages=0 must be at least 1");
  EXPECT_ERROR(dsv3::one_f_one_b(4, 4, 4), "pipeline stage 4 is outside 0..3");
  EXPECT_ERROR(dsv3::one_f_one_b(4, -1, 4), "pipeline stage -1 is outside 0..3");
  EXPECT_ERROR(dsv3::one_f_one_b(4, 0, 0), "micro-batches=0 must be at least 1");
  EXPECT_ERROR(dsv3::simulate_1f1b(2, 0), "micro-batches=0 must be at least 1");
}
