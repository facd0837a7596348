// defines: dsv3::Op, Action, one_f_one_b, warmup_microbatches, format_schedule, PipelineTimeline,
//          simulate_pipeline, simulate_1f1b
// The non-interleaved 1F1B pipeline schedule (PipeDream-Flush, Megatron-Core's
// forward_backward_pipelining_without_interleaving) as a pure function: the ordered list of forward and
// backward steps one stage runs for one optimizer step, with the point-to-point transfers each step needs.
// The trainer walks the list; the simulation below runs every stage's list together to show that the
// schedule cannot deadlock and what its pipeline bubble is.
//
// Three loops, for p stages, this stage s and m micro-batches:
//   1. warmup   : w = min(p - s - 1, m) forwards F(0..w-1). Stage s runs ahead by p-s-1 micro-batches so
//                 that the first backward reaches it exactly when its forwards would otherwise stall; the last
//                 stage has no warmup.
//   2. steady   : m - w rounds of "F(w+k) then B(k)" (one forward, one backward). At most w+1 micro-batches'
//                 activations are alive on stage s at any time: p - s, not m as in GPipe.
//   3. cooldown : the w backwards B(m-w..m-1) left over from the warmup.
// Example, p=4, m=6:  stage 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5
//                     stage 3: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5
// Transfers, attached to the step they belong to: a forward receives its input activations from stage s-1
// before it runs (recv_fwd) and sends its output to s+1 after (send_fwd); a backward receives the gradient of
// its output from s+1 (recv_bwd) and sends the gradient of its input to s-1 (send_bwd). The first stage never
// receives activations nor sends gradients (it reads the tokens); the last never sends activations nor
// receives gradients (it computes the loss). The executor may fuse a send with the next step's receive
// into one batched exchange, as Megatron's send_forward_recv_backward does; each direction of each pipeline
// link carries the micro-batches in increasing order, so messages pair up without tags.
#pragma once
#include <string>
#include <vector>

namespace dsv3 {

enum class Op { Forward, Backward };

struct Action {
  Op op = Op::Forward;
  int microbatch = 0;  // 0..m-1
  bool recv_fwd = false, send_fwd = false;  // Forward only
  bool recv_bwd = false, send_bwd = false;  // Backward only
  bool operator==(const Action&) const = default;
};

// The forwards stage `stage` runs before its first backward: min(stages - stage - 1, microbatches).
int warmup_microbatches(int stages, int stage, int microbatches);
// The 2*microbatches steps of `stage` (0-based) in a pipeline of `stages`, in order.
std::vector<Action> one_f_one_b(int stages, int stage, int microbatches);
// "F0 F1 B0 F2 B1 B2" (for logs and test failures).
std::string format_schedule(const std::vector<Action>& actions);

// The timing of every stage running its list: each step takes t_forward or t_backward, transfers are free
// and do not block the sender (isend), a stage runs its steps in order, F(i) on stage s waits for F(i) on
// s-1, B(i) on stage s waits for B(i) on s+1 and for F(i) on s.
struct PipelineTimeline {
  double makespan = 0;         // end of the last step
  double bubble_fraction = 0;  // idle share of stage-time: 1 - busy / (stages * makespan); 1F1B: (p-1)/(m+p-1)
  std::vector<std::vector<double>> start;  // [stage][step] start time
};
// schedules[s] is stage s's list. Throws dsv3::Error for a malformed list (a micro-batch missing or twice, a
// transfer flag that does not match the stage's position) and for a deadlock, naming each stuck stage's step.
PipelineTimeline simulate_pipeline(const std::vector<std::vector<Action>>& schedules, double t_forward = 1.0,
                                   double t_backward = 2.0);
// simulate_pipeline of one_f_one_b for every stage.
PipelineTimeline simulate_1f1b(int stages, int microbatches, double t_forward = 1.0, double t_backward = 2.0);

}  // namespace dsv3
