#include "adsc/schedule.h"

#include <cstdio>
#include <cstring>

#include "checks.h"

namespace adsc {
namespace {

bool is_ascii_digit(char c) { return c >= '0' && c <= '9'; }  // not std::isdigit: no locale

// Reads a non-negative decimal integer at *p (ASCII digits, no sign, at most 9 of them, so it
// fits an int); advances *p.
bool read_uint(const char** p, int* value) {
  const char* s = *p;
  int digits = 0;
  long v = 0;
  while (is_ascii_digit(*s) && digits < 10) {
    v = v * 10 + (*s - '0');
    ++s;
    ++digits;
  }
  if (digits == 0 || digits > 9) return false;
  *value = static_cast<int>(v);
  *p = s;
  return true;
}

void skip_spaces(const char** p) {
  while (**p == ' ' || **p == '\t') ++*p;
}

}  // namespace

Status parse_schedule(const char* text, Schedule* out) noexcept {
  if (text == nullptr || out == nullptr)
    return fail(Status::kInvalidArgument, "parse_schedule: text and out must not be null");
  Schedule sched;
  const char* p = text;
  skip_spaces(&p);
  if (*p == '\0') {
    *out = sched;
    return Status::kOk;
  }
  for (int item = 0;; ++item) {
    const char* item_start = p;
    int layer = 0, factor = 0;
    skip_spaces(&p);
    bool ok = read_uint(&p, &layer);
    skip_spaces(&p);
    ok = ok && *p == ':';
    if (ok) {
      ++p;
      skip_spaces(&p);
      ok = read_uint(&p, &factor);
      skip_spaces(&p);
    }
    if (!ok || (*p != ',' && *p != '\0')) {
      const char* end = std::strchr(item_start, ',');
      int len = end ? static_cast<int>(end - item_start) : static_cast<int>(std::strlen(item_start));
      return fail(Status::kInvalidArgument,
                  "bad schedule item %d '%.*s' in '%s': expected 'layer:factor' with two "
                  "non-negative integers, e.g. '8:2,16:2,24:2'",
                  item, len, item_start, text);
    }
    if (sched.num_steps == kMaxSteps)
      return fail(Status::kInvalidArgument, "schedule '%s' has more than %d steps", text, kMaxSteps);
    if (layer < 1)
      return fail(Status::kInvalidArgument,
                  "schedule '%s', step %d: layer must be >= 1 (downsampling happens before a "
                  "layer), got %d", text, item, layer);
    if (sched.num_steps > 0 && layer <= sched.layers[sched.num_steps - 1])
      return fail(Status::kInvalidArgument,
                  "schedule '%s', step %d: layers must be strictly increasing, got %d after %d",
                  text, item, layer, sched.layers[sched.num_steps - 1]);
    if (factor != 2 && factor != 4)
      return fail(Status::kInvalidArgument,
                  "schedule '%s', step %d: factor must be 2 or 4, got %d", text, item, factor);
    sched.layers[sched.num_steps] = layer;
    sched.factors[sched.num_steps] = factor;
    ++sched.num_steps;
    if (*p == '\0') break;
    ++p;  // ','
  }
  *out = sched;
  return Status::kOk;
}

Status check_schedule(const Schedule& schedule) noexcept {
  if (schedule.num_steps < 0 || schedule.num_steps > kMaxSteps)
    return fail(Status::kInvalidArgument, "a schedule has 0..%d steps, got %d", kMaxSteps,
                schedule.num_steps);
  for (int s = 0; s < schedule.num_steps; ++s) {
    const int layer = schedule.layers[s], factor = schedule.factors[s];
    if (layer < 1)
      return fail(Status::kInvalidArgument, "schedule step %d (%d:%d): layer must be >= 1 "
                  "(downsampling happens before a layer)", s, layer, factor);
    if (layer > kMaxLayer)
      return fail(Status::kInvalidArgument, "schedule step %d (%d:%d): layer must be at most %d "
                  "(9 digits, what the text form holds)", s, layer, factor, kMaxLayer);
    if (s > 0 && layer <= schedule.layers[s - 1])
      return fail(Status::kInvalidArgument, "schedule step %d (%d:%d): layers must be strictly "
                  "increasing, got %d after %d", s, layer, factor, layer, schedule.layers[s - 1]);
    if (factor != 2 && factor != 4)
      return fail(Status::kInvalidArgument, "schedule step %d (%d:%d): factor must be 2 or 4",
                  s, layer, factor);
  }
  return Status::kOk;
}

Status format_schedule(const Schedule& schedule, char* buffer, size_t size) noexcept {
  if (buffer == nullptr || size == 0)
    return fail(Status::kInvalidArgument, "format_schedule: buffer must hold at least 1 byte");
  buffer[0] = '\0';
  ADSC_RETURN_IF_ERROR(check_schedule(schedule));
  size_t used = 0;
  for (int i = 0; i < schedule.num_steps; ++i) {
    int n = std::snprintf(buffer + used, size - used, "%s%d:%d", i ? "," : "",
                          schedule.layers[i], schedule.factors[i]);
    if (n < 0 || static_cast<size_t>(n) >= size - used)
      return fail(Status::kInvalidArgument, "format_schedule: buffer of %zu bytes is too small",
                  size);
    used += static_cast<size_t>(n);
  }
  return Status::kOk;
}

Status validate_schedule(const Schedule& schedule, int num_layers, int grid_h, int grid_w,
                         int* grids_h, int* grids_w) noexcept {
  if (schedule.num_steps < 0 || schedule.num_steps > kMaxSteps)
    return fail(Status::kInvalidArgument, "a schedule has 0..%d steps, got %d", kMaxSteps,
                schedule.num_steps);
  if (num_layers < 1)
    return fail(Status::kInvalidArgument, "num_layers must be >= 1, got %d", num_layers);
  if (grid_h < 1 || grid_w < 1)
    return fail(Status::kInvalidArgument, "an image grid needs positive sides, got %dx%d", grid_h,
                grid_w);
  // The two outputs: aligned, and not sharing bytes (each would overwrite the other's grids).
  constexpr bool kWritten = detail::BufferSet::kWritten;
  ADSC_RETURN_IF_ERROR(detail::BufferSet("validate_schedule")
                           .array("grids_h", grids_h, schedule.num_steps + 1, sizeof(int), kWritten)
                           .array("grids_w", grids_w, schedule.num_steps + 1, sizeof(int), kWritten)
                           .check());
  int h = grid_h, w = grid_w;
  if (grids_h) grids_h[0] = h;
  if (grids_w) grids_w[0] = w;
  for (int s = 0; s < schedule.num_steps; ++s) {
    const int layer = schedule.layers[s], factor = schedule.factors[s];
    if (layer < 1 || layer >= num_layers)
      return fail(Status::kInvalidArgument,
                  "step %d:%d does not fit a model with %d decoder layers: need 1 <= layer < %d",
                  layer, factor, num_layers, num_layers);
    if (s > 0 && layer <= schedule.layers[s - 1])
      return fail(Status::kInvalidArgument, "layers must be strictly increasing, got %d after %d",
                  layer, schedule.layers[s - 1]);
    if (factor != 2 && factor != 4)
      return fail(Status::kInvalidArgument, "step %d:%d: factor must be 2 or 4", layer, factor);
    bool hr, hc;
    step_axes(factor, h, w, &hr, &hc);
    if ((hr && h < 2) || (hc && w < 2))
      return fail(Status::kInvalidArgument,
                  "step %d:%d cannot downsample a %dx%d grid (from %dx%d): it would halve a side "
                  "of length 1", layer, factor, h, w, grid_h, grid_w);
    if (hr) h = halved(h);
    if (hc) w = halved(w);
    if (grids_h) grids_h[s + 1] = h;
    if (grids_w) grids_w[s + 1] = w;
  }
  return Status::kOk;
}

}  // namespace adsc
