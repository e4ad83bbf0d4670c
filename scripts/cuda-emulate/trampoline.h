// trampoline.h: the entry points an emulated kernel module exports to device.cpp (the emulated
// CUDA driver). build-device.sh compiles each kernels/<stem>.cu with emulate.h into its own
// shared library and appends one EMU_EXPORT(name) per exported kernel, which defines
//   emu_<name>(params, grid, threads, smem)  runs the kernel over the grid (emulate.h `launch`),
//                                            its arguments read from the driver's params array
//                                            (a pointer to each argument's value, as
//                                            cuLaunchKernel takes them);
//   emu_sizes_<name>(sizes)                  writes each parameter's size, returns their count
//                                            (a graph keeps copies of the values it captured).
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

template <class... A, std::size_t... I>
void emu_invoke(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}
template <class... A>
void emu_run(void (*k)(A...), void** p, dim3 grid, unsigned threads, std::size_t smem) {
    launch(grid, threads, [&] { emu_invoke(k, p, std::index_sequence_for<A...>{}); }, smem);
}
template <class... A>
int emu_param_sizes(void (*)(A...), std::size_t* out) {
    static_assert(sizeof...(A) <= 64, "device.cpp takes at most 64 kernel parameters (EMU_MAX_PARAMS)");
    const std::size_t s[] = {sizeof(A)...};
    for (std::size_t i = 0; i < sizeof...(A); ++i) out[i] = s[i];
    return (int)sizeof...(A);
}

#define EMU_EXPORT(name)                                                                                  \
    extern "C" __attribute__((visibility("default"))) void emu_##name(void** p, unsigned gx, unsigned gy, \
                                                                      unsigned gz, unsigned threads,      \
                                                                      std::size_t smem) {                 \
        emu_run(name, p, dim3{gx, gy, gz}, threads, smem);                                                \
    }                                                                                                     \
    extern "C" __attribute__((visibility("default"))) int emu_sizes_##name(std::size_t* out) {            \
        return emu_param_sizes(name, out);                                                                \
    }
