// Optional native part of fastcache: a shared library with a C ABI, loaded lazily by
// fastcache/native.py through ctypes. Nothing in the Python path requires it. It is the home of
// future host-side helpers (e.g. a C++ replay loop); for now it reports its ABI version so the
// build, the loader and CI are exercised end to end.
#include <cstdint>

extern "C" {

// Bumped whenever the exported functions change; fastcache/native.py checks it.
int32_t fastcache_native_abi_version() { return 1; }

// Uniform refresh schedule, the reference the loader test compares with the Python one:
// writes 1 at refresh steps (every `interval` steps from 0) and 0 elsewhere.
int32_t fastcache_native_uniform_schedule(int32_t num_steps, int32_t interval, uint8_t* out) {
  if (num_steps < 0 || interval < 1 || out == nullptr) return -1;
  for (int32_t step = 0; step < num_steps; ++step) out[step] = (step % interval == 0) ? 1 : 0;
  return 0;
}

}  // extern "C"
