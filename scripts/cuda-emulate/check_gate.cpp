// check_gate.cpp: the gate-first step's kernels of kernels/hybrid.cu against references written
// from that file's banner, launched as src/cuda/hybrid_kernels.rs does (hybrid.cu itself is
// included by check_small.cpp, which check.cpp includes first):
//   hybrid_gate_i32            grid 1, block ceil(B / 32)·32 and 1024: need[b] = !gating
//                              || think_tok[b] != tok[b]; the needing problems in order get
//                              sel[i] = b, cidx[b] = i (−1 for the others), live[0] = n·C; every
//                              problem emit = tok, steered 0, win −1.
//   hybrid_expand_compact_f32  grid B·C, block 256: row j = i·C + c of compact problem i < n copies
//                              saved[sel[i]] and takes its category, coefs[c], position and slot;
//                              rows j ≥ n·C keep their residual and take problem sel[0]'s (problem
//                              0's when n = 0) position, slot and category (their coef is not
//                              specified).
//   hybrid_select_compact_i32  grid ceil(B / 128), block 128: for i < n, b = sel[i], the
//                              candidate tok[i·C + c] with the largest think_logits[b, ·] (first
//                              on ties, ids outside [0, V) score −inf); nothing else written.
//   hybrid_gather_f32          with cidx: r[b] = saved[steered[b] ? B + cidx[b]·C + win[b] : b].
// Each case runs the four in the step's order, each kernel on the reference outputs of the one
// before, so that one kernel's bug neither hides nor fakes another's. Cases: B = 1, 5, 37, 64,
// 200 with some, none or all problems needing candidates, and gating off. Exact throughout
// (copies and integers). Entries past n of sel (which the gate leaves alone) hold a problem that
// needs nothing (or B − 1), so a kernel reading them writes where it must not, or reads the
// wrong problem.

namespace gate_check {

// One line comparing several integer outputs; on a mismatch it names the output and index.
struct Part {
    const char* name;
    std::vector<int> got, want;
};
static void same_parts(const char* what, const std::vector<Part>& parts) {
    size_t n = 0;
    for (const Part& p : parts) {
        for (size_t i = 0; i < p.want.size(); ++i)
            if (p.got[i] != p.want[i]) {
                char buf[120];
                snprintf(buf, sizeof buf, "%s[%zu] got %d want %d", p.name, i, p.got[i], p.want[i]);
                report(what, false, buf);
                return;
            }
        n += p.want.size();
    }
    report(what, true, std::to_string(n) + " values equal");
}

enum Need { Some, None, All };
static const char* need_name(Need k) { return k == Some ? "some need" : k == None ? "none need" : "all need"; }

static void step(int B, int C, int gating, Need kind) {
    const int D = 40, V = 50;
    // Base and thinking greedy ids of the problem rows. Some: problems b ≡ 1 (mod 3) or ≡ 2
    // (mod 5) disagree (problem 0 agrees, so sel[0] ≠ 0 shows).
    std::vector<int> tok(B), think(B);
    for (int b = 0; b < B; ++b) {
        tok[b] = (int)(rng() % V);
        const bool differ = kind == All || (kind == Some && (b % 3 == 1 || b % 5 == 2));
        think[b] = differ ? (tok[b] + 1 + (int)(rng() % (V - 1))) % V : tok[b];
    }
    // Gate reference.
    std::vector<int> sel_w, cidx_w(B, -1), emit_w(tok), steered_w(B, 0), win_w(B, -1);
    int spare = B - 1;  // a problem needing nothing (the last one), else B − 1
    for (int b = 0; b < B; ++b)
        if (!gating || think[b] != tok[b]) {
            cidx_w[b] = (int)sel_w.size();
            sel_w.push_back(b);
        } else
            spare = b;
    const int n = (int)sel_w.size();
    char tag[112];
    snprintf(tag, sizeof tag, "hybrid gate-first B %d C %d gating %d (%s): n %d", B, C, gating, need_name(kind), n);
    printf("%s\n", tag);

    const int host_block = (B + 31) / 32 * 32;
    for (int block : {host_block, 1024}) {
        std::vector<int> sel(B, -9), cidx(B, -9), live(1, -9), emit(B, -9), steered(B, -9), win(B, -9);
        launch(dim3{1, 1, 1}, (unsigned)block, [&] {
            hybrid_gate_i32(sel.data(), cidx.data(), live.data(), emit.data(), steered.data(), win.data(), tok.data(),
                            think.data(), B, C, gating);
        });
        sel.resize(n);  // entries past n are not specified
        snprintf(tag, sizeof tag, "  hybrid_gate_i32 block %d", block);
        same_parts(tag, {{"sel", sel, sel_w},
                         {"cidx", cidx, cidx_w},
                         {"live", live, {n * C}},
                         {"emit", emit, emit_w},
                         {"steered", steered, steered_w},
                         {"win", win, win_w}});
    }
    std::vector<int> sel_in(sel_w);
    sel_in.resize(B, spare);
    const int live_in = n * C;

    // Expand: candidate rows [0, B·C) from the problems' saved residuals.
    const auto saved = randv((size_t)B * D), coefs = randv(C);
    std::vector<int> category(B), pos_p(B), slot_p(B);
    for (int b = 0; b < B; ++b) {
        category[b] = (b * 5 + 1) % 7;
        pos_p[b] = 10 + 3 * b;
        slot_p[b] = (b * 7 + 2) % (B + 3);
    }
    const int rows = B * C;
    auto r = randv((size_t)rows * D);
    const auto r0 = r;
    std::vector<int> idx(rows, -9), pos(rows, -9), slot(rows, -9);
    std::vector<float> coef(rows, NAN);
    launch(dim3{(unsigned)rows, 1, 1}, 256, [&] {
        hybrid_expand_compact_f32(r.data(), idx.data(), coef.data(), pos.data(), slot.data(), saved.data(),
                                  sel_in.data(), &live_in, category.data(), coefs.data(), pos_p.data(), slot_p.data(),
                                  C, D);
    });
    std::vector<double> r_want(r0.begin(), r0.end()), coef_want(rows, 0.0);
    std::vector<int> idx_w(rows), pos_w(rows), slot_w(rows);
    std::vector<char> real(rows, 0);
    const int pad = n > 0 ? sel_w[0] : 0;  // the problem whose metadata the rows past n·C take
    for (int j = 0; j < rows; ++j) {
        const int i = j / C, c = j % C, b = i < n ? sel_w[i] : pad;
        real[j] = i < n;
        idx_w[j] = category[b];
        pos_w[j] = pos_p[b];
        slot_w[j] = slot_p[b];
        if (i >= n) continue;
        coef_want[j] = coefs[c];
        for (int d = 0; d < D; ++d) r_want[(size_t)j * D + d] = saved[(size_t)b * D + d];
    }
    within("  hybrid_expand_compact_f32 r (exact)", r, r_want, std::vector<double>(r_want.size(), 0.0));
    within("  hybrid_expand_compact_f32 coef of real rows", pick(coef, real), pick(coef_want, real),
           std::vector<double>(n * C, 0.0));
    same_parts("  hybrid_expand_compact_f32 idx, pos, slot",
               {{"idx", idx, idx_w}, {"pos", pos, pos_w}, {"slot", slot, slot_w}});

    // Select among the compact problems' candidates (rows i·C + c), by the thinking model's
    // logits of problem sel[i]. Some ids out of range; compact problems i ≡ 1 (mod 4) have a tie
    // (two candidates with one token), i ≡ 3 (mod 5) only ids out of range (all −inf: the first),
    // i ≡ 2 (mod 6) a first candidate whose logit is −inf and then ids out of range (a tie at −inf:
    // the first; an out-of-range score above −inf would pick another).
    auto tl = randv((size_t)B * V);
    std::vector<int> ctok(rows);
    for (int j = 0; j < rows; ++j) ctok[j] = (int)(rng() % (V + 2)) - 1;
    for (int i = 0; i < B; ++i) {
        if (i % 4 == 1 && C >= 3) ctok[i * C + C - 1] = ctok[i * C + 1];
        if (i % 5 == 3)
            for (int c = 0; c < C; ++c) ctok[i * C + c] = c % 2 ? -1 - c : V + c;
        if (i % 6 == 2 && i < n) {
            ctok[i * C] = i % V;
            tl[(size_t)sel_w[i] * V + i % V] = -INFINITY;
            for (int c = 1; c < C; ++c) ctok[i * C + c] = V + c;
        }
    }
    std::vector<int> emit(B, -9), steered(B, -9), win(B, -9);
    std::vector<int> emit_s(B, -9), steered_s(B, -9), win_s(B, -9);  // what select must leave
    for (int i = 0; i < n; ++i) {
        const int b = sel_w[i];
        int best = 0;
        double bv = -INFINITY;
        for (int c = 0; c < C; ++c) {
            const int t = ctok[i * C + c];
            const double v = t >= 0 && t < V ? (double)tl[(size_t)b * V + t] : -INFINITY;
            if (v > bv) {  // strictly larger: the first of equals stays
                best = c;
                bv = v;
            }
        }
        emit_s[b] = ctok[i * C + best];
        steered_s[b] = 1;
        win_s[b] = best;
    }
    launch(dim3{(unsigned)((B + 127) / 128), 1, 1}, 128, [&] {
        hybrid_select_compact_i32(emit.data(), steered.data(), win.data(), ctok.data(), sel_in.data(), &live_in,
                                  tl.data(), B, C, V);
    });
    same_parts("  hybrid_select_compact_i32 emit, steered, win",
               {{"emit", emit, emit_s}, {"steered", steered, steered_s}, {"win", win, win_s}});

    // Gather (persistent mode) on the step's decision: the gate's for every problem, then the
    // select's for the needing ones.
    std::vector<int> st(steered_w), wn(win_w);
    for (int b : sel_w) {
        st[b] = 1;
        wn[b] = win_s[b];
    }
    const auto saved_g = randv((size_t)(B + rows) * D);
    std::vector<float> out((size_t)B * D, NAN);
    launch(dim3{(unsigned)B, 1, 1}, 256,
           [&] { hybrid_gather_f32(out.data(), saved_g.data(), st.data(), wn.data(), cidx_w.data(), B, C, D); });
    std::vector<double> g_want((size_t)B * D);
    for (int b = 0; b < B; ++b) {
        const int row = st[b] ? B + cidx_w[b] * C + wn[b] : b;
        for (int d = 0; d < D; ++d) g_want[(size_t)b * D + d] = saved_g[(size_t)row * D + d];
    }
    within("  hybrid_gather_f32 with cidx (exact)", out, g_want, std::vector<double>(g_want.size(), 0.0));
}

}  // namespace gate_check

void run_gate() {
    using namespace gate_check;
    OwnRng own(106);
    for (int B : {1, 5, 37, 64, 200}) {
        const int C = B % 2 ? 3 : 4;
        step(B, C, 1, Some);
        step(B, C, 1, None);
        step(B, C, 1, All);
        step(B, C, 0, Some);  // gating off: every problem needs candidates
    }
}
