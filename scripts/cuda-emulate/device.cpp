// device.cpp: an emulated CUDA driver (libcuda.so) that runs the kernels of kernels/*.cu on the
// CPU through emulate.h, so that the whole CUDA engine — the host code of src/cuda/ with its
// buffers, launches, streams, events and CUDA graphs — runs in CI against the CPU backend. Built
// by build-device.sh into a folder that is put first on LD_LIBRARY_PATH; cudarc then opens it
// in place of NVIDIA's driver. It covers the driver calls this crate makes, no more; a call it
// lacks makes cudarc panic naming the symbol.
//
// The devices: two, each of compute capability 9.0, 132 multiprocessors, 80 GiB, with a primary
// context each; the current context is per thread, as in CUDA. Memory is host memory (a
// device pointer is an address), filled with 0xff bytes when allocated (NaN in f32 and bf16), so
// a read of memory never written shows. The cubin or PTX given to cuModuleLoadData is not run:
// cuModuleGetFunction finds the kernel of that name in the emulated modules (modules/*.so beside
// this library, one per kernel file, each exporting emu_<kernel> and emu_sizes_<kernel>, see
// trampoline.h).
//
// Work is deferred: each stream queues its launches, copies, sets, frees and graph launches, and
// runs them only when the host must see their effect (a stream, event or context
// synchronisation, a copy to host memory, a free), one at a time. A stream waiting on an event
// queues that wait; running past it first runs the other stream up to the event. Where more
// than one stream has work, it runs in one of two orders, in turn (one count for the streams,
// one per graph): other streams as late as the waits allow, or as early as they allow. Either
// order respects every dependency the host expressed, and no other: a missing wait between two
// streams lets a reader run before its writer (or a writer before its reader) in one of them,
// and the results differ from the CPU's. The null stream runs its work at once and waits for no
// other (cudarc's streams are non-blocking). A stream being captured records its work and its
// waits into the graph instead (a stream that waits on an event recorded during a capture joins
// that capture, as in CUDA), and launching the graph runs them the same way.
//
// What CUDA refuses, this refuses too: a kernel launched while another device's context is
// current, or on another device's stream; a kernel given a pointer into another device's
// memory (on the hardware, without peer access, an illegal address); allocating, freeing, synchronous copies and synchronising during a capture (the
// capture is then invalid), a capturing stream waiting on an event from outside its capture, a
// capture ended with a joined stream not joined back, more dynamic shared memory than the
// kernel's attribute allows (48 KB unless raised), a zero-byte allocation; and launches the
// hardware cannot run, judged from the cubin ptxas made for the kernel (read_cubin): more
// registers per block than compute capability 9.0 has, more threads than its
// __launch_bounds__, too much shared memory, a grid's y or z above 65,535.
#include <cuda.h>
#include <dirent.h>
#include <dlfcn.h>

#include <chrono>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#define API extern "C" __attribute__((visibility("default")))

namespace {

std::recursive_mutex mu;

using RunFn = void (*)(void**, unsigned, unsigned, unsigned, unsigned, size_t);
// What ptxas decided for a kernel (read_cubin; zeros where no cubin was read: then unchecked):
// registers per thread, bytes of __shared__ variables (without the 1 KB sm_90 reserves), the
// block size its __launch_bounds__ allows (0: none given).
struct Resources {
    int regs = 0, static_smem = 0, max_threads = 0;
};
using SizesFn = int (*)(size_t*);  // writes at most EMU_MAX_PARAMS sizes (trampoline.h)
const int EMU_MAX_PARAMS = 64;
// A device's primary context.
struct Ctx {
    int device;
};
const int DEVICES = 2;
Ctx contexts[DEVICES] = {{0}, {1}};
// The calling thread's current context (cudarc binds one before its calls; a thread that never
// bound one is taken to be on device 0).
thread_local Ctx* current = nullptr;
Ctx* cur() { return current ? current : &contexts[0]; }
struct Func {
    Ctx* ctx;
    std::string name;
    RunFn run;
    SizesFn sizes;
    int max_dynamic_smem = 48 << 10;  // raised by cuFuncSetAttribute, as on the hardware
    Resources res;
};
enum Kind { KERNEL, COPY, SET8, SET32, FREE };
struct Node {
    Kind kind;
    Func* f = nullptr;
    unsigned grid[3] = {1, 1, 1}, threads = 1;
    size_t smem = 0;
    std::vector<std::vector<char>> args;
    void* dst = nullptr;
    const void* src = nullptr;
    size_t n = 0;
    unsigned value = 0;
};
struct Graph;
struct Stream;
// A stream's queued item: an operation (a node, or a graph launch), or a wait for the first
// `upto` operations of stream `on`.
struct Entry {
    enum { OP, WAIT, GRAPH } what;
    Node node;
    Stream* on = nullptr;
    unsigned long long upto = 0;
    Graph* graph = nullptr;
};
struct Graph {
    Stream* origin = nullptr;                       // the stream that began the capture
    std::vector<std::pair<Stream*, Entry>> entries;  // captured, in issue order, by stream
    unsigned long long id = 0;
    bool invalidated = false;  // an operation CUDA forbids during capture was attempted
    unsigned long long turns = 0;  // replays that had a choice of order
};
// What a stream (or a stream's part of a graph) has yet to run, and how many operations it ran.
struct Lane {
    std::deque<Entry> queue;
    unsigned long long done = 0;
};
struct Stream {
    Ctx* ctx = nullptr;  // the context it was created in (null: the null stream, any context)
    Graph* capture = nullptr;
    unsigned long long ops = 0;  // operations issued into the capture
    std::map<Stream*, unsigned long long> awaited;  // per stream: its ops this one has waited for
    Lane lane;                     // eager work not yet run
    unsigned long long issued = 0;  // eager operations issued (run or queued)
    unsigned long long serial = 0;  // told apart from a later stream at the same address
};
struct Event {
    unsigned long long capture = 0;  // id of the capture it was recorded in (0: none)
    Stream* stream = nullptr;        // where, and after how many of that stream's ops
    unsigned long long serial = 0;   // of that stream
    unsigned long long ops = 0;
    bool timing = true;
    double t = 0;
};
unsigned long long next_capture_id = 1;

Stream null_stream;
std::set<Stream*> streams{&null_stream};
std::vector<void*> modules;
std::map<std::pair<Ctx*, std::string>, std::unique_ptr<Func>> funcs;  // per context, as in CUDA
struct Allocation {
    size_t n;
    int device;
};
std::map<void*, Allocation> allocations;
size_t allocated[DEVICES] = {};
const size_t TOTAL = 80ull << 30;

// The device of the allocation holding address p, or -1.
int device_of(const void* p) {
    auto it = allocations.upper_bound(const_cast<void*>(p));
    if (it == allocations.begin()) return -1;
    --it;
    const char *a = static_cast<const char*>(it->first), *q = static_cast<const char*>(p);
    return q < a + it->second.n ? it->second.device : -1;
}

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
Stream* S(CUstream s) { return s ? reinterpret_cast<Stream*>(s) : &null_stream; }
unsigned long long next_stream_serial = 1;
// The stream an eagerly recorded event waits for, if it still exists (its work not yet all run).
Stream* recorded_on(const Event* ev) {
    Stream* st = ev->stream;
    return st && streams.count(st) && st->serial == ev->serial ? st : nullptr;
}

// Hardware limits of compute capability 9.0 that a launch must respect (CUDA C++ Programming
// Guide, "Technical Specifications per Compute Capability"): 64 K registers per block, given out
// per warp in units of 256; 227 KB of shared memory per block (static + dynamic), of which at
// most 48 KB static; grid y and z at most 65,535.
const int REGS_PER_BLOCK = 65536, REG_UNIT = 256, SMEM_PER_BLOCK = 232448, STATIC_SMEM = 48 << 10;
const unsigned GRID_YZ = 65535;

// What ptxas decided for each kernel of the cubins given to cuModuleLoadData, by kernel name (the
// names are unique across kernels/*.cu). Read from the ELF file: the registers from the
// EIATTR_REGCOUNT (0x2f) entries of `.nv.info` (symbol index, count), the __launch_bounds__
// block size from EIATTR_MAX_THREADS (0x05) in `.nv.info.<kernel>`, the static shared memory
// from the size of `.nv.shared.<kernel>` (which on sm_90 includes the 1 KB the hardware
// reserves per block when a `.nv.shared.reserved.0` section is present). A PTX image is skipped.
std::map<std::string, Resources> resources;

template <class T>
T read_at(const unsigned char* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

void read_cubin(const void* image) {
    const auto* e = static_cast<const unsigned char*>(image);
    if (std::memcmp(e, "\x7f" "ELF", 4) != 0 || e[4] != 2) return;  // PTX text, or not a 64-bit ELF
    const auto shoff = read_at<uint64_t>(e + 0x28);
    const unsigned shentsize = read_at<uint16_t>(e + 0x3a), shnum = read_at<uint16_t>(e + 0x3c),
                   shstrndx = read_at<uint16_t>(e + 0x3e);
    struct Section {
        uint32_t name_at;
        std::string name;
        uint32_t link;
        const unsigned char* data;
        uint64_t size;
    };
    std::vector<Section> sec(shnum);
    for (unsigned i = 0; i < shnum; ++i) {
        const unsigned char* h = e + shoff + (uint64_t)i * shentsize;
        sec[i] = {read_at<uint32_t>(h), "", read_at<uint32_t>(h + 40), e + read_at<uint64_t>(h + 24),
                  read_at<uint64_t>(h + 32)};
    }
    for (Section& s : sec) s.name = reinterpret_cast<const char*>(sec[shstrndx].data + s.name_at);
    bool reserved = false;
    for (const Section& s : sec) reserved |= s.name == ".nv.shared.reserved.0";
    // Each entry: format byte, attribute byte, then a 16-bit value, or (format 4) a 16-bit size
    // and that many bytes.
    auto entries = [](const Section& s, auto&& take) {
        for (uint64_t i = 0; i + 4 <= s.size;) {
            const unsigned fmt = s.data[i], attr = s.data[i + 1], v = read_at<uint16_t>(s.data + i + 2);
            if (fmt == 4) {
                take(attr, s.data + i + 4, v);
                i += 4 + v;
            } else {
                i += 4;
            }
        }
    };
    const std::string info = ".nv.info.", shared = ".nv.shared.";
    for (const Section& s : sec) {
        if (s.name == ".nv.info") {
            const Section& symtab = sec[s.link];
            const unsigned char* names = sec[symtab.link].data;
            entries(s, [&](unsigned attr, const unsigned char* p, unsigned n) {
                if (attr != 0x2f || n != 8) return;
                const uint32_t sym = read_at<uint32_t>(p);
                const char* name = reinterpret_cast<const char*>(names + read_at<uint32_t>(symtab.data + 24ull * sym));
                resources[name].regs = (int)read_at<uint32_t>(p + 4);
            });
        } else if (s.name.rfind(info, 0) == 0) {
            entries(s, [&](unsigned attr, const unsigned char* p, unsigned n) {
                if (attr == 0x05 && n == 12) resources[s.name.substr(info.size())].max_threads = (int)read_at<uint32_t>(p);
            });
        } else if (s.name.rfind(shared, 0) == 0 && s.name != ".nv.shared.reserved.0") {
            resources[s.name.substr(shared.size())].static_smem = (int)s.size - (reserved ? 1024 : 0);
        }
    }
}

void load_modules() {
    static bool done = false;
    if (done) return;
    done = true;
    Dl_info info;
    dladdr(reinterpret_cast<void*>(&load_modules), &info);
    std::string dir = info.dli_fname;
    dir = dir.substr(0, dir.rfind('/') + 1) + "modules";
    DIR* d = opendir(dir.c_str());
    if (!d) {
        std::fprintf(stderr, "cuda-emulate: no kernel modules in %s\n", dir.c_str());
        return;
    }
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n.size() > 3 && n.substr(n.size() - 3) == ".so") {
            void* h = dlopen((dir + "/" + n).c_str(), RTLD_NOW | RTLD_LOCAL);
            if (h)
                modules.push_back(h);
            else
                std::fprintf(stderr, "cuda-emulate: %s\n", dlerror());
        }
    }
    closedir(d);
}

void free_now(void* m) {
    auto it = allocations.find(m);
    if (it == allocations.end()) return;
    allocated[it->second.device] -= it->second.n;
    allocations.erase(it);
    std::free(m);
}

void run(const Node& n) {
    switch (n.kind) {
        case KERNEL: {
            std::vector<void*> p;
            for (auto& a : n.args) p.push_back(const_cast<char*>(a.data()));
            n.f->run(p.data(), n.grid[0], n.grid[1], n.grid[2], n.threads, n.smem);
            break;
        }
        case COPY:  // from the snapshot of host memory taken when it was queued, if any
            std::memmove(n.dst, n.args.empty() ? n.src : n.args[0].data(), n.n);
            break;
        case SET8:
            std::memset(n.dst, (int)(n.value & 0xff), n.n);
            break;
        case SET32:
            for (size_t i = 0; i < n.n; ++i) static_cast<unsigned*>(n.dst)[i] = n.value;
            break;
        case FREE:
            free_now(n.dst);
            break;
    }
}

// The executor of deferred work: `lanes` maps each stream to what it has left to run (its own
// queue, or its part of a graph being replayed). `late`: other streams run only when a wait
// needs them (else as early as their waits allow: before each operation of the stream being
// advanced, every other stream runs as far as it can without waiting). A stream in the middle
// of an advance (waiting for another, further up the call chain) is never run by run_ready:
// its next operations come after the wait being resolved.
struct Lanes {
    std::map<Stream*, Lane*> of;
    std::set<Stream*> advancing;
};
void replay(Graph& g);
void advance(Lanes& lanes, Stream* s, unsigned long long upto, bool late);
void run_entry(Lanes& lanes, Lane& l, Entry e, bool late) {
    switch (e.what) {
        case Entry::WAIT:
            if (lanes.of.count(e.on)) advance(lanes, e.on, e.upto, late);
            return;
        case Entry::OP:
            run(e.node);
            break;
        case Entry::GRAPH:
            replay(*e.graph);
            break;
    }
    ++l.done;
}
void run_ready(Lanes& lanes) {
    for (auto& [st, l] : lanes.of) {
        if (lanes.advancing.count(st)) continue;
        while (!l->queue.empty()) {
            const Entry& e = l->queue.front();
            if (e.what == Entry::WAIT && lanes.of.count(e.on) && lanes.of[e.on]->done < e.upto) break;
            Entry x = std::move(l->queue.front());
            l->queue.pop_front();
            run_entry(lanes, *l, std::move(x), false);
        }
    }
}
// Runs stream s until it has run `upto` operations or has nothing left.
void advance(Lanes& lanes, Stream* s, unsigned long long upto, bool late) {
    Lane& l = *lanes.of[s];
    const bool outer = lanes.advancing.insert(s).second;
    while (l.done < upto && !l.queue.empty()) {
        if (!late) run_ready(lanes);
        if (l.queue.empty()) break;
        Entry e = std::move(l.queue.front());
        l.queue.pop_front();
        run_entry(lanes, l, std::move(e), late);
    }
    if (outer) lanes.advancing.erase(s);
}
// Whether more than one lane has work: only then does the order matter (and a turn pass).
bool contended(const Lanes& lanes) {
    int busy = 0;
    for (auto& [st, l] : lanes.of) busy += !l->queue.empty();
    return busy > 1;
}
// The two orders, in turn: one counter for the streams' eager work, one per graph.
unsigned long long eager_turns = 0;
bool next_late(unsigned long long& turns, const Lanes& lanes) {
    return contended(lanes) ? (turns++ & 1) == 0 : true;
}
Lanes eager_lanes() {
    Lanes lanes;
    for (Stream* st : streams) lanes.of[st] = &st->lane;
    return lanes;
}
// Runs the eager work stream s must have run by its operation `upto` (all of it by default).
void flush(Stream* s, unsigned long long upto = ~0ull) {
    Lanes lanes = eager_lanes();
    advance(lanes, s, upto, next_late(eager_turns, lanes));
}
void flush_all() {
    Lanes lanes = eager_lanes();
    const bool late = next_late(eager_turns, lanes);
    for (Stream* st : streams) advance(lanes, st, ~0ull, late);
}
// A graph's work, its streams' parts run in one of the two orders (the graph's own turns): the
// origin's part is advanced first, so when late the other parts run only as its waits (the
// fork's joins) need them.
void replay(Graph& g) {
    std::map<Stream*, Lane> parts;
    for (const auto& [st, e] : g.entries) parts[st].queue.push_back(e);
    Lanes lanes;
    for (auto& [st, l] : parts) lanes.of[st] = &l;
    const bool late = next_late(g.turns, lanes);
    if (lanes.of.count(g.origin)) advance(lanes, g.origin, ~0ull, late);
    for (auto& [st, l] : lanes.of) advance(lanes, st, ~0ull, late);
}

// Records the node when the stream is being captured, else queues it on the stream. The null
// stream runs it at once: cudarc's streams are non-blocking, so the legacy null stream does not
// wait for them (a host-synchronous call on it sees only what the host synchronised before).
CUresult issue(CUstream s, Node n) {
    Stream* st = S(s);
    if (Graph* g = st->capture) {
        ++st->ops;
        g->entries.push_back({st, Entry{Entry::OP, std::move(n)}});
    } else if (st == &null_stream) {
        run(n);
    } else {
        ++st->issued;
        st->lane.queue.push_back(Entry{Entry::OP, std::move(n)});
    }
    return CUDA_SUCCESS;
}

// Whether any stream is being captured; a call CUDA forbids then (allocation, freeing, a
// synchronous copy, a context synchronisation) fails and invalidates every capture, as in CUDA's
// default (global / thread-local) capture modes.
bool forbidden_during_capture() {
    bool any = false;
    for (Stream* st : streams)
        if (st->capture) {
            st->capture->invalidated = true;
            any = true;
        }
    return any;
}

CUresult copy(void* dst, const void* src, size_t n, CUstream s) {
    Node node{COPY};
    node.dst = dst;
    node.n = n;
    // Read when the copy runs (a captured copy reads its source at every replay, as CUDA's
    // memcpy node does).
    node.src = src;
    return issue(s, std::move(node));
}

// n elements (bytes for SET8, 4-byte words for SET32) of value v from d.
CUresult set_memory(Kind kind, CUdeviceptr d, unsigned v, size_t n, CUstream s) {
    Node node{kind};
    node.dst = reinterpret_cast<void*>(d);
    node.value = v;
    node.n = n;
    return issue(s, std::move(node));
}

CUresult launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                unsigned smem, CUstream s, void** params) {
    Func* fn = reinterpret_cast<Func*>(f);
    // A launch runs in the current context: its kernel and stream must belong to it.
    if (fn->ctx != cur() || (S(s)->ctx && S(s)->ctx != cur())) {
        std::fprintf(stderr, "cuda-emulate: %s (a kernel of device %d) launched on a stream of device %d while "
                     "device %d's context is current\n", fn->name.c_str(), fn->ctx->device,
                     S(s)->ctx ? S(s)->ctx->device : cur()->device, cur()->device);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (by * bz != 1 || bx == 0 || bx > 1024 || gx * gy * gz == 0) {
        std::fprintf(stderr, "cuda-emulate: %s launched with block (%u, %u, %u), grid (%u, %u, %u)\n",
                     fn->name.c_str(), bx, by, bz, gx, gy, gz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (gy > GRID_YZ || gz > GRID_YZ) {
        std::fprintf(stderr, "cuda-emulate: %s launched with grid (%u, %u, %u): y and z may be at most %u\n",
                     fn->name.c_str(), gx, gy, gz, GRID_YZ);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (fn->res.max_threads && (int)bx > fn->res.max_threads) {
        std::fprintf(stderr, "cuda-emulate: %s launched with %u threads per block, above its __launch_bounds__ (%d)\n",
                     fn->name.c_str(), bx, fn->res.max_threads);
        return CUDA_ERROR_INVALID_VALUE;
    }
    const int warps = (int)(bx + 31) / 32, per_warp = (fn->res.regs * 32 + REG_UNIT - 1) / REG_UNIT * REG_UNIT;
    if (warps * per_warp > REGS_PER_BLOCK) {
        std::fprintf(stderr, "cuda-emulate: %s needs %d registers per block (%d per thread, %u threads), above the %d "
                     "of compute capability 9.0: the launch fails with too many resources requested\n",
                     fn->name.c_str(), warps * per_warp, fn->res.regs, bx, REGS_PER_BLOCK);
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if (fn->res.static_smem > STATIC_SMEM || fn->res.static_smem + (int)smem > SMEM_PER_BLOCK) {
        std::fprintf(stderr, "cuda-emulate: %s uses %d bytes of static and %u of dynamic shared memory: at most %d "
                     "static and %d in all per block\n", fn->name.c_str(), fn->res.static_smem, smem, STATIC_SMEM,
                     SMEM_PER_BLOCK);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)smem > fn->max_dynamic_smem) {
        std::fprintf(stderr, "cuda-emulate: %s launched with %u bytes of dynamic shared memory, above its %d "
                     "(raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first)\n", fn->name.c_str(), smem,
                     fn->max_dynamic_smem);
        return CUDA_ERROR_INVALID_VALUE;
    }
    Node n{KERNEL};
    n.f = fn;
    n.grid[0] = gx, n.grid[1] = gy, n.grid[2] = gz;
    n.threads = bx;
    n.smem = smem;
    size_t sizes[EMU_MAX_PARAMS];
    const int count = fn->sizes(sizes);
    for (int i = 0; i < count; ++i) {
        const char* p = static_cast<const char*>(params[i]);
        n.args.emplace_back(p, p + sizes[i]);
        // A pointer argument into another device's memory (8-byte arguments that fall inside an
        // allocation; a scalar that does so by chance is not expected at these addresses).
        if (sizes[i] == 8) {
            void* q;
            std::memcpy(&q, p, 8);
            const int dev = device_of(q);
            if (dev >= 0 && dev != fn->ctx->device) {
                std::fprintf(stderr, "cuda-emulate: %s on device %d given argument %d pointing into device %d's "
                             "memory\n", fn->name.c_str(), fn->ctx->device, i, dev);
                return CUDA_ERROR_ILLEGAL_ADDRESS;
            }
        }
    }
    return issue(s, std::move(n));
}

}  // namespace

#define LOCK std::lock_guard<std::recursive_mutex> lock_(mu)

// Errors.
API CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == CUDA_SUCCESS ? "no error" : "error in the emulated CUDA driver (scripts/cuda-emulate/device.cpp)";
    return CUDA_SUCCESS;
}
API CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == CUDA_SUCCESS ? "CUDA_SUCCESS" : "CUDA_ERROR_EMULATED";
    return CUDA_SUCCESS;
}

// Driver, device, context. (NVRTC opens the driver too and asks for its private export tables:
// there are none here, which it takes as a driver without them.)
API CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
API CUresult cuGetExportTable(const void** table, const CUuuid*) {
    *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = DEVICES;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal < 0 || ordinal >= DEVICES) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "emulated CUDA device (scripts/cuda-emulate)");
    return CUDA_SUCCESS;
}
API CUresult cuDeviceTotalMem(size_t* b, CUdevice) {
    *b = TOTAL;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 0x7fffffff; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 49152; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 232448; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = 233472; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = 2048; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *v = 50 << 20; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 1; break;  // cudarc: stream-ordered allocation
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (d < 0 || d >= DEVICES) return CUDA_ERROR_INVALID_DEVICE;
    *c = reinterpret_cast<CUcontext>(&contexts[d]);
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease(CUdevice) { return CUDA_SUCCESS; }
API CUresult cuDevicePrimaryCtxReset(CUdevice) { return CUDA_SUCCESS; }
thread_local std::vector<Ctx*> pushed;  // cuCtxPushCurrent's stack below the current context
API CUresult cuCtxSetCurrent(CUcontext c) {
    current = reinterpret_cast<Ctx*>(c);
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = reinterpret_cast<CUcontext>(current);
    return CUDA_SUCCESS;
}
API CUresult cuCtxPushCurrent(CUcontext c) {
    pushed.push_back(current);
    current = reinterpret_cast<Ctx*>(c);
    return CUDA_SUCCESS;
}
API CUresult cuCtxPopCurrent(CUcontext* c) {
    if (c) *c = reinterpret_cast<CUcontext>(current);
    current = pushed.empty() ? nullptr : pushed.back();
    if (!pushed.empty()) pushed.pop_back();
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = cur()->device;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() {
    LOCK;
    if (forbidden_during_capture()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    flush_all();
    return CUDA_SUCCESS;
}

// Memory.
API CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
    LOCK;
    *free_bytes = TOTAL - allocated[cur()->device];
    *total = TOTAL;
    return CUDA_SUCCESS;
}
// On `device`: the current context's for cuMemAlloc, the stream's for cuMemAllocAsync (CUDA takes
// stream-ordered memory from the pool of the stream's device).
CUresult alloc_on(int device, CUdeviceptr* p, size_t n) {
    LOCK;
    if (n == 0) return CUDA_ERROR_INVALID_VALUE;
    if (forbidden_during_capture()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (allocated[device] + n > TOTAL) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t rounded = (n + 255) / 256 * 256;  // 256-byte aligned, as cudaMalloc's
    void* m = std::aligned_alloc(256, rounded);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(m, 0xff, rounded);
    allocations[m] = {n, device};
    allocated[device] += n;
    *p = reinterpret_cast<CUdeviceptr>(m);
    return CUDA_SUCCESS;
}
API CUresult cuMemAlloc(CUdeviceptr* p, size_t n) { return alloc_on(cur()->device, p, n); }
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream s) {
    return alloc_on(S(s)->ctx ? S(s)->ctx->device : cur()->device, p, n);
}
API CUresult cuMemFree(CUdeviceptr p) {
    LOCK;
    if (forbidden_during_capture()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    void* m = reinterpret_cast<void*>(p);
    if (!allocations.count(m)) return p ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
    flush_all();
    free_now(m);
    return CUDA_SUCCESS;
}
// Stream-ordered: the memory goes when the stream's earlier work has run.
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    LOCK;
    if (forbidden_during_capture()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    void* m = reinterpret_cast<void*>(p);
    if (!allocations.count(m)) return p ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
    Node node{FREE};
    node.dst = m;
    return issue(s, std::move(node));
}
API CUresult cuMemcpyHtoD(CUdeviceptr d, const void* h, size_t n) {
    LOCK;
    if (forbidden_during_capture()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return copy(reinterpret_cast<void*>(d), h, n, nullptr);
}
// Host memory is read when the copy is queued, as CUDA stages pageable memory (the host may
// reuse it at once); a captured copy reads it at every replay.
API CUresult cuMemcpyHtoDAsync(CUdeviceptr d, const void* h, size_t n, CUstream s) {
    LOCK;
    if (S(s)->capture) return copy(reinterpret_cast<void*>(d), h, n, s);
    Node node{COPY};
    node.dst = reinterpret_cast<void*>(d);
    node.n = n;
    node.args.emplace_back(static_cast<const char*>(h), static_cast<const char*>(h) + n);
    return issue(s, std::move(node));
}
API CUresult cuMemcpyDtoH(void* h, CUdeviceptr d, size_t n) {
    LOCK;
    if (forbidden_during_capture()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return copy(h, reinterpret_cast<const void*>(d), n, nullptr);
}
// Into pageable host memory (the crate allocates no pinned memory) CUDA returns only once the
// copy, and so the stream's earlier work, has completed.
API CUresult cuMemcpyDtoHAsync(void* h, CUdeviceptr d, size_t n, CUstream s) {
    LOCK;
    const CUresult r = copy(h, reinterpret_cast<const void*>(d), n, s);
    if (r == CUDA_SUCCESS && !S(s)->capture && S(s) != &null_stream) flush(S(s), S(s)->issued);
    return r;
}
API CUresult cuMemcpyDtoD(CUdeviceptr d, CUdeviceptr s_, size_t n) {
    LOCK;
    if (forbidden_during_capture()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return copy(reinterpret_cast<void*>(d), reinterpret_cast<const void*>(s_), n, nullptr);
}
API CUresult cuMemcpyDtoDAsync(CUdeviceptr d, CUdeviceptr s_, size_t n, CUstream s) {
    LOCK;
    return copy(reinterpret_cast<void*>(d), reinterpret_cast<const void*>(s_), n, s);
}
API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) {
    LOCK;
    return set_memory(SET8, d, v, n, s);
}
API CUresult cuMemsetD8(CUdeviceptr d, unsigned char v, size_t n) { return cuMemsetD8Async(d, v, n, nullptr); }
API CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream s) {
    LOCK;
    return set_memory(SET32, d, v, n, s);
}

// Streams and events.
API CUresult cuStreamCreate(CUstream* s, unsigned) {
    LOCK;
    Stream* st = new Stream;
    st->ctx = cur();
    st->serial = next_stream_serial++;
    streams.insert(st);
    *s = reinterpret_cast<CUstream>(st);
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
API CUresult cuStreamDestroy(CUstream s) {
    LOCK;
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    flush(S(s));  // its work still completes
    streams.erase(S(s));
    for (Stream* st : streams)  // waits on it are met (and must not match a later stream here)
        std::erase_if(st->lane.queue, [&](const Entry& e) { return e.what == Entry::WAIT && e.on == S(s); });
    if (s) delete S(s);
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(CUstream s) {
    LOCK;
    if (S(s)->capture) {
        S(s)->capture->invalidated = true;
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    flush(S(s));  // the null stream has nothing queued
    return CUDA_SUCCESS;
}
API CUresult cuStreamQuery(CUstream s) {
    LOCK;
    if (S(s)->capture) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    flush(S(s));
    return CUDA_SUCCESS;
}
API CUresult cuEventCreate(CUevent* e, unsigned flags) {
    LOCK;
    Event* ev = new Event;
    ev->timing = !(flags & CU_EVENT_DISABLE_TIMING);
    *e = reinterpret_cast<CUevent>(ev);
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy(CUevent e) {
    LOCK;
    delete reinterpret_cast<Event*>(e);
    return CUDA_SUCCESS;
}
// Inside a capture a record is only a dependency marker (no graph node): it notes the stream
// and how many of its captured operations precede it.
API CUresult cuEventRecord(CUevent e, CUstream s) {
    LOCK;
    Event* ev = reinterpret_cast<Event*>(e);
    if (Graph* g = S(s)->capture) {
        ev->capture = g->id;
        ev->stream = S(s);
        ev->ops = S(s)->ops;
        return CUDA_SUCCESS;
    }
    ev->capture = 0;
    ev->stream = S(s) == &null_stream ? nullptr : S(s);  // the null stream's work runs at once
    ev->serial = S(s)->serial;
    ev->ops = S(s)->issued;
    ev->t = now();
    return CUDA_SUCCESS;
}
API CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
// A stream waiting on an event recorded in an active capture joins that capture (a fork); the
// capturing stream that waits notes how much of the recording stream it now depends on (a join,
// checked at cuStreamEndCapture). A capturing stream may not wait on an event recorded outside
// its capture.
API CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    LOCK;
    Event* ev = reinterpret_cast<Event*>(e);
    Graph* active = nullptr;
    for (Stream* st : streams)
        if (ev->capture && st->capture && st->capture->id == ev->capture) active = st->capture;
    if (Graph* g = S(s)->capture) {
        if (!active || active != g) {
            g->invalidated = true;
            return CUDA_ERROR_STREAM_CAPTURE_ISOLATION;
        }
        auto& seen = S(s)->awaited[ev->stream];
        seen = std::max(seen, ev->ops);
        g->entries.push_back({S(s), Entry{Entry::WAIT, Node{}, ev->stream, ev->ops}});
    } else if (active) {
        S(s)->capture = active;
        S(s)->ops = 0;
        S(s)->awaited.clear();
        active->entries.push_back({S(s), Entry{Entry::WAIT, Node{}, ev->stream, ev->ops}});
    } else if (ev->capture) {
        return CUDA_ERROR_CAPTURED_EVENT;  // last recorded in a capture that has ended
    } else if (Stream* src = recorded_on(ev); src && src != S(s)) {
        if (S(s) == &null_stream)
            flush(src, ev->ops);
        else
            S(s)->lane.queue.push_back(Entry{Entry::WAIT, Node{}, src, ev->ops});
    }
    return CUDA_SUCCESS;
}
API CUresult cuEventSynchronize(CUevent e) {
    LOCK;
    Event* ev = reinterpret_cast<Event*>(e);
    if (ev->capture) return CUDA_ERROR_CAPTURED_EVENT;
    if (Stream* src = recorded_on(ev)) flush(src, ev->ops);
    return CUDA_SUCCESS;
}
API CUresult cuEventQuery(CUevent e) { return cuEventSynchronize(e); }
API CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    LOCK;
    const Event *x = reinterpret_cast<Event*>(a), *y = reinterpret_cast<Event*>(b);
    if (!x->timing || !y->timing || x->capture || y->capture) return CUDA_ERROR_INVALID_HANDLE;
    *ms = (float)((y->t - x->t) * 1e3);
    return CUDA_SUCCESS;
}

// Modules and launches.
API CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    LOCK;
    load_modules();
    read_cubin(image);
    *m = reinterpret_cast<CUmodule>(cur());  // a module belongs to the current context
    return CUDA_SUCCESS;
}
API CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
API CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    LOCK;
    Ctx* ctx = reinterpret_cast<Ctx*>(m);
    auto it = funcs.find({ctx, name});
    if (it == funcs.end()) {
        const std::string run = std::string("emu_") + name, sizes = std::string("emu_sizes_") + name;
        for (void* h : modules) {
            auto r = reinterpret_cast<RunFn>(dlsym(h, run.c_str()));
            auto z = reinterpret_cast<SizesFn>(dlsym(h, sizes.c_str()));
            if (r && z) {
                it = funcs.emplace(std::make_pair(ctx, std::string(name)), std::make_unique<Func>(Func{ctx, name, r, z}))
                         .first;
                if (auto k = resources.find(name); k != resources.end()) it->second->res = k->second;
                break;
            }
        }
        if (it == funcs.end()) {
            std::fprintf(stderr, "cuda-emulate: no emulated kernel %s\n", name);
            return CUDA_ERROR_NOT_FOUND;
        }
    }
    *f = reinterpret_cast<CUfunction>(it->second.get());
    return CUDA_SUCCESS;
}
API CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction f) {
    const Func* fn = reinterpret_cast<Func*>(f);
    *v = a == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? (fn->res.max_threads ? fn->res.max_threads : 1024)
         : a == CU_FUNC_ATTRIBUTE_NUM_REGS            ? fn->res.regs
         : a == CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES   ? fn->res.static_smem
                                                      : 0;
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
    LOCK;
    if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        if (v + reinterpret_cast<Func*>(f)->res.static_smem > SMEM_PER_BLOCK) return CUDA_ERROR_INVALID_VALUE;
        reinterpret_cast<Func*>(f)->max_dynamic_smem = v;
    }
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetCacheConfig(CUfunction, CUfunc_cache) { return CUDA_SUCCESS; }
API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned smem, CUstream s, void** params, void**) {
    LOCK;
    return launch(f, gx, gy, gz, bx, by, bz, smem, s, params);
}
API CUresult cuLaunchKernelEx(const CUlaunchConfig* c, CUfunction f, void** params, void**) {
    LOCK;
    return launch(f, c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY, c->blockDimZ,
                  c->sharedMemBytes, c->hStream, params);
}

// Graphs.
API CUresult cuStreamBeginCapture(CUstream s, CUstreamCaptureMode) {
    LOCK;
    if (S(s)->capture) return CUDA_ERROR_ILLEGAL_STATE;
    S(s)->capture = new Graph;
    S(s)->capture->id = next_capture_id++;
    S(s)->capture->origin = S(s);
    S(s)->ops = 0;
    S(s)->awaited.clear();
    return CUDA_SUCCESS;
}
API CUresult cuStreamEndCapture(CUstream s, CUgraph* g) {
    LOCK;
    Graph* graph = S(s)->capture;
    if (!graph) return CUDA_ERROR_ILLEGAL_STATE;
    // Every stream that joined must have been joined back: the origin waited on an event
    // recorded after its last captured operation.
    bool unjoined = false;
    for (Stream* st : streams)
        if (st != S(s) && st->capture == graph) {
            auto it = S(s)->awaited.find(st);
            if (st->ops > 0 && (it == S(s)->awaited.end() || it->second < st->ops)) unjoined = true;
        }
    for (Stream* st : streams)
        if (st->capture == graph) st->capture = nullptr;
    *g = nullptr;
    if (unjoined || graph->invalidated) {
        delete graph;
        return unjoined ? CUDA_ERROR_STREAM_CAPTURE_UNJOINED : CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *g = reinterpret_cast<CUgraph>(graph);
    return CUDA_SUCCESS;
}
API CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus* st) {
    LOCK;
    *st = S(s)->capture ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}
API CUresult cuGraphInstantiateWithFlags(CUgraphExec* e, CUgraph g, unsigned long long) {
    LOCK;
    *e = reinterpret_cast<CUgraphExec>(new Graph(*reinterpret_cast<Graph*>(g)));
    return CUDA_SUCCESS;
}
API CUresult cuGraphLaunch(CUgraphExec e, CUstream s) {
    LOCK;
    Stream* st = S(s);
    if (st->capture) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    Graph* g = reinterpret_cast<Graph*>(e);
    if (st == &null_stream) {
        replay(*g);
    } else {
        ++st->issued;
        Entry x{Entry::GRAPH};
        x.graph = g;
        st->lane.queue.push_back(std::move(x));
    }
    return CUDA_SUCCESS;
}
API CUresult cuGraphUpload(CUgraphExec, CUstream) { return CUDA_SUCCESS; }
API CUresult cuGraphDestroy(CUgraph g) {
    LOCK;
    delete reinterpret_cast<Graph*>(g);
    return CUDA_SUCCESS;
}
API CUresult cuGraphExecDestroy(CUgraphExec e) {
    LOCK;
    flush_all();  // launches of it still queued run first
    delete reinterpret_cast<Graph*>(e);
    return CUDA_SUCCESS;
}
