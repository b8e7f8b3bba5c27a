// adsc/schedule.h: ADSC schedules (spec section 2) and the downsampling rule (spec section 4).
#pragma once

#include <cstddef>

#include "adsc/common.h"
#include "adsc/status.h"

namespace adsc {

// Most downsampling steps a schedule may have (a 24x24 grid runs out after 10 halvings).
constexpr int kMaxSteps = 16;

// Largest layer number of a schedule: the text form holds at most 9 digits per number.
constexpr int kMaxLayer = 999999999;

struct Schedule {
  int num_steps = 0;
  int layers[kMaxSteps] = {};   // decoder layer before which step i happens; strictly increasing, >= 1
  int factors[kMaxSteps] = {};  // 2 (halve the longer side; tie: width) or 4 (halve both sides)
};

// Parses "layer:factor,layer:factor,..." ("" is the empty schedule). Numbers are 1 to 9 ASCII
// digits; spaces and tabs may surround every number. Checks syntax, layer >= 1, strictly
// increasing layers and factor in {2, 4}.
Status parse_schedule(const char* text, Schedule* out) noexcept;

// Checks a schedule filled by hand: 0..kMaxSteps steps, layers >= 1 and strictly increasing,
// factors 2 or 4 (what parse_schedule guarantees).
Status check_schedule(const Schedule& schedule) noexcept;

// Writes the canonical text of `schedule` into `buffer` (always NUL-terminated when size > 0).
Status format_schedule(const Schedule& schedule, char* buffer, size_t size) noexcept;

// Checks `schedule` against a model with `num_layers` decoder layers and an h x w image grid.
// grids_h / grids_w (may be null) receive num_steps + 1 entries: the grid of every stage.
Status validate_schedule(const Schedule& schedule, int num_layers, int grid_h, int grid_w,
                         int* grids_h, int* grids_w) noexcept;

// ---- The downsampling rule, usable on host and device --------------------------------------

// Which axes one step halves on an h x w grid.
ADSC_HD void step_axes(int factor, int h, int w, bool* halve_rows, bool* halve_cols) {
  *halve_rows = factor == 4 || h > w;
  *halve_cols = factor == 4 || h <= w;
}

// Halving an axis of length n keeps, for each pair g, index min(2g+1, n-1): the odd indices plus
// the last one when n is odd. The survivor's index on the halved axis is i / 2.
ADSC_HD bool axis_keeps(int i, int n) { return (i & 1) != 0 || i == n - 1; }

// ceil(n / 2) for n >= 0, without overflowing at INT_MAX.
ADSC_HD int halved(int n) { return n - n / 2; }

// Whether every step of `factors` can be applied to an h x w grid (no side of length 1 halved).
ADSC_HD bool grid_fits(int h, int w, const int* factors, int num_steps) {
  for (int s = 0; s < num_steps; ++s) {
    bool hr, hc;
    step_axes(factors[s], h, w, &hr, &hc);
    if ((hr && h < 2) || (hc && w < 2)) return false;
    if (hr) h = halved(h);
    if (hc) w = halved(w);
  }
  return true;
}

// How many steps of `factors` the token in row `row`, column `col` of an h x w image survives
// (num_steps = all of them). Column col == w is the row's newline token (LLaVA-NeXT / OneVision
// anyres grids, spec section 3): it is kept exactly while its row is, since halving columns never
// removes it. The grid must fit the steps (grid_fits); the newline column does not count as one.
ADSC_HD int survived_steps_at(int row, int col, int h, int w, const int* factors, int num_steps) {
  const bool newline = col == w;
  for (int s = 0; s < num_steps; ++s) {
    bool hr, hc;
    step_axes(factors[s], h, w, &hr, &hc);
    if ((hr && !axis_keeps(row, h)) || (hc && !newline && !axis_keeps(col, w))) return s;
    if (hr) { row >>= 1; h = halved(h); }
    if (hc) { col >>= 1; w = halved(w); }
  }
  return num_steps;
}

// The same for the token at raster index r of an h x w image (no newline column).
ADSC_HD int survived_steps(int r, int h, int w, const int* factors, int num_steps) {
  return survived_steps_at(r / w, r % w, h, w, factors, num_steps);
}

}  // namespace adsc
