//! The steering-vector loss and its gradient dL/dv on the GPU: the same function as
//! `vector_grad::loss_grad` (src/vector_grad/grad.rs, whose module comment writes out the ops),
//! run as one flat list of kernel launches (kernels/grad.cu) on the engine's bf16 weights, with
//! every activation and gradient stored in f32 (the tensor-core products see each f32 operand as
//! two bf16 terms, ≤ 2^-16 off; see `kernels::vg_mm`). Weights are frozen: only input gradients
//! are formed.
//!
//! Per call, on the active rows (Ta of them, starting at absolute position S0), with
//! nl = N − L − 1 blocks after the steering block L; QKV = (H + 2Hkv)·Dh:
//!   upload h_L [Ta, D], the prefix K/V [S0, Hkv·Dh] per block, the index lists, v and extra
//!   h[steer] += v + extra
//!   per block l (forward, saving h_in, r1, qkv, lse, h_mid, r2, gu of block l):
//!     xn = rmsnorm(h) [Ta, D]; qkv = xn·Wqkvᵀ + b [Ta, QKV]; rope(q | k)
//!     a = attention(q, [k_pre; k], [v_pre; v]) [Ta, H·Dh]; h += a·Woᵀ
//!     xn = rmsnorm(h); gu = xn·Wguᵀ [Ta, 2F]; act = silu(g)·u [Ta, F]; h += act·Wdᵀ
//!   head per chunk of predicting rows R: x = h[R] [R, D]; xn = rmsnorm(x); z = xn·W_lmᵀ [R, V];
//!     loss, z ← dz; dxn = dz·W_lm [R, D]; dh[R] += rms_bwd(dxn)
//!   per block in reverse: dact = dh·Wd [Ta, F]; dgu = silu_bwd; dxn = dgu·Wgu [Ta, D];
//!     dh += rms_bwd(dxn); da = dh·Wo [Ta, H·Dh]; dqkv = attention_bwd(da) [Ta, QKV];
//!     rope⁻¹(dq | dk); dxn = dqkv·Wqkv; dh += rms_bwd(dxn)
//!   grad [D] = Σ_{r ∈ steer} dh[r]; download the per-row losses and the gradient.
//!
//! Buffers are kept between calls and grown when an example needs more.

use super::kernels::{self as k, Mm, VgAttn};
use super::model::CudaWeights;
use super::{cuda_err, Gpu};
use crate::bail;
use crate::config::Config;
use crate::error::Result;
use crate::vector_grad::{Frozen, LossGrad};
use cudarc::driver::CudaSlice;
use std::sync::Arc;

/// Rows of the LM head computed together: bounds the [R, V] f32 logits buffer.
const HEAD_CHUNK: usize = 128;
/// Floats of split-K partial sums for the matrix products (32 MB): e.g. 11 splits of the
/// [128, 1536] head gradient dz·W_lm, whose K = V is long and whose output is 24 tiles.
const PART: usize = 1 << 23;

/// Buffer sizes an example needs (each buffer holds at least this).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Dims {
    ta: usize,    // active rows
    s: usize,     // S0 + Ta: keys of the last active row
    nl: usize,    // blocks after the steering block
    steer: usize, // steer rows
}

struct Bufs {
    dims: Dims,
    h: CudaSlice<f32>,     // [Ta, D]
    dh: CudaSlice<f32>,    // [Ta, D]
    xn: CudaSlice<f32>,    // [Ta, D]
    a: CudaSlice<f32>,     // [Ta, H·Dh]  attention output, then its gradient
    act: CudaSlice<f32>,   // [Ta, F]     silu·up, then its gradient
    dgu: CudaSlice<f32>,   // [Ta, 2F]
    dqkv: CudaSlice<f32>,  // [Ta, QKV]
    sc: CudaSlice<f32>,    // [Ta·H, S]   scores / P
    ds: CudaSlice<f32>,    // [Ta·H, S]   dS
    h_in: CudaSlice<f32>,  // [nl, Ta, D]
    r1: CudaSlice<f32>,    // [nl, Ta]
    qkv: CudaSlice<f32>,   // [nl, Ta, QKV]
    lse: CudaSlice<f32>,   // [nl, Ta, H]
    h_mid: CudaSlice<f32>, // [nl, Ta, D]
    r2: CudaSlice<f32>,    // [nl, Ta]
    gu: CudaSlice<f32>,    // [nl, Ta, 2F]
    k_pre: CudaSlice<f32>, // [nl, S0, Hkv·Dh]
    v_pre: CudaSlice<f32>, // [nl, S0, Hkv·Dh]
    steer: CudaSlice<i32>, // [steer]
}

/// Buffers of the LM head, sized for HEAD_CHUNK rows.
struct Head {
    rows: CudaSlice<i32>,  // [R]
    y: CudaSlice<i32>,     // [R]
    x: CudaSlice<f32>,     // [R, D]
    xn: CudaSlice<f32>,    // [R, D]
    rn: CudaSlice<f32>,    // [R]
    z: CudaSlice<f32>,     // [R, V]
    loss: CudaSlice<f32>,  // [R]
    dxn: CudaSlice<f32>,   // [R, D]
    dx: CudaSlice<f32>,    // [R, D]
    v: CudaSlice<f32>,     // [D] the vector, then the gradient
    extra: CudaSlice<f32>, // [D]
}

/// The GPU loss-and-gradient of the steering vector over shared device weights (an engine's).
pub struct CudaVectorGrad {
    gpu: Arc<Gpu>,
    c: Config,
    w: Arc<CudaWeights>,
    inv_freq: CudaSlice<f32>, // [Dh/2]
    head: Head,
    part: CudaSlice<f32>, // [PART] split-K partial sums of vg_mm
    bufs: Option<Bufs>,
}

impl CudaVectorGrad {
    /// Over the weights `w` of a model with config `c` (e.g. a CudaEngine's `gpu`, `config` and
    /// `w`, cloned).
    pub fn new(gpu: Arc<Gpu>, c: &Config, w: Arc<CudaWeights>) -> Result<Self> {
        if w.layers.len() != c.num_hidden_layers {
            bail!(
                "vector gradient: expected {} layers of weights, found {}",
                c.num_hidden_layers,
                w.layers.len()
            );
        }
        let st = &gpu.stream;
        let (d, r) = (c.hidden_size, HEAD_CHUNK);
        let f32s = |n: usize| {
            st.alloc_zeros::<f32>(n.max(1))
                .map_err(cuda_err("allocating vector-gradient buffers"))
        };
        let i32s = |n: usize| {
            st.alloc_zeros::<i32>(n.max(1))
                .map_err(cuda_err("allocating vector-gradient buffers"))
        };
        let head = Head {
            rows: i32s(r)?,
            y: i32s(r)?,
            x: f32s(r * d)?,
            xn: f32s(r * d)?,
            rn: f32s(r)?,
            z: f32s(r * c.vocab_size)?,
            loss: f32s(r)?,
            dxn: f32s(r * d)?,
            dx: f32s(r * d)?,
            v: f32s(d)?,
            extra: f32s(d)?,
        };
        let inv_freq = st
            .clone_htod(&c.rope_inv_freq())
            .map_err(cuda_err("uploading inv_freq"))?;
        let part = f32s(PART)?;
        Ok(CudaVectorGrad {
            gpu,
            c: c.clone(),
            w,
            inv_freq,
            head,
            part,
            bufs: None,
        })
    }

    fn ensure(&mut self, want: Dims) -> Result<()> {
        if let Some(b) = &self.bufs {
            let h = b.dims;
            if h.ta >= want.ta && h.s >= want.s && h.nl >= want.nl && h.steer >= want.steer {
                return Ok(());
            }
        }
        let old = self.bufs.take().map(|b| b.dims).unwrap_or_default();
        let c = &self.c;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let qkv = qd + 2 * kvd;
        // Bytes of the buffers below for dims dm (the f32 ones in order, then steer).
        let bytes = |dm: &Dims| {
            let (ta, nl) = (dm.ta, dm.nl);
            4 * (3 * ta * d
                + ta * (qd + 3 * f + qkv)
                + 2 * ta * c.num_attention_heads * dm.s
                + nl * ta * (2 * d + 2 + qkv + c.num_attention_heads + 2 * f)
                + 2 * nl * dm.s * kvd
                + dm.steer)
        };
        self.gpu.sync()?; // the old buffers' frees are done
        let (free, _) = self.gpu.mem_info()?;
        // Grow by at least a quarter so a run of slowly growing examples reallocates rarely, where
        // that fits; refuse, before allocating, what does not fit at all.
        let grow = |o: usize, n: usize| if n > o { n.max(o + o / 4) } else { o };
        let grown = Dims {
            ta: grow(old.ta, want.ta),
            s: grow(old.s, want.s),
            nl: old.nl.max(want.nl),
            steer: grow(old.steer, want.steer),
        };
        // 64 MB kept back for the allocator's rounding of 19 buffers and the driver.
        let free = free.saturating_sub(64 << 20);
        let dm = if bytes(&grown) <= free { grown } else { want };
        if bytes(&dm) > free {
            bail!(
                "vector gradient: an example of {} active rows after {} context positions through {} blocks needs {:.2} GiB of GPU buffers; the card has {:.2} GiB free: use shorter spans or a later steering layer",
                want.ta,
                want.s.saturating_sub(want.ta),
                want.nl,
                bytes(&want) as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            );
        }
        let (ta, nl) = (dm.ta, dm.nl);
        let st = &self.gpu.stream;
        let f32s = |n: usize| {
            st.alloc_zeros::<f32>(n.max(1))
                .map_err(cuda_err("allocating vector-gradient buffers"))
        };
        let sc = ta * c.num_attention_heads * dm.s;
        self.bufs = Some(Bufs {
            dims: dm,
            h: f32s(ta * d)?,
            dh: f32s(ta * d)?,
            xn: f32s(ta * d)?,
            a: f32s(ta * qd)?,
            act: f32s(ta * f)?,
            dgu: f32s(ta * 2 * f)?,
            dqkv: f32s(ta * qkv)?,
            sc: f32s(sc)?,
            ds: f32s(sc)?,
            h_in: f32s(nl * ta * d)?,
            r1: f32s(nl * ta)?,
            qkv: f32s(nl * ta * qkv)?,
            lse: f32s(nl * ta * c.num_attention_heads)?,
            h_mid: f32s(nl * ta * d)?,
            r2: f32s(nl * ta)?,
            gu: f32s(nl * ta * 2 * f)?,
            k_pre: f32s(nl * dm.s * kvd)?,
            v_pre: f32s(nl * dm.s * kvd)?,
            steer: st
                .alloc_zeros::<i32>(dm.steer.max(1))
                .map_err(cuda_err("allocating vector-gradient buffers"))?,
        });
        Ok(())
    }

    /// The loss of `fz` summed over its target tokens, their count, and d(loss_sum)/dv [D], with
    /// v [D] (plus the frozen `extra` [D]) added at its steer rows: `vector_grad::loss_grad`
    /// on the GPU. Without `want_grad` only the forward runs and the gradient is zeros.
    pub fn loss_grad(
        &mut self,
        fz: &Frozen,
        v: &[f32],
        extra: Option<&[f32]>,
        coldness: f32,
        want_grad: bool,
    ) -> Result<LossGrad<f32>> {
        let c = self.c.clone();
        let (d, f, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let qkvw = qd + 2 * kvd;
        let n = c.num_hidden_layers;
        if v.len() != d {
            bail!(
                "vector gradient: expected a vector of D = {d} entries, found {}",
                v.len()
            );
        }
        if let Some(e) = extra {
            if e.len() != d {
                bail!(
                    "vector gradient: expected extra of D = {d} entries, found {}",
                    e.len()
                );
            }
        }
        if fz.layer >= n {
            bail!(
                "vector gradient: steering block {} is not below {n} blocks",
                fz.layer
            );
        }
        let nl = n - fz.layer - 1;
        let (ta, s0) = (fz.ta, fz.s0);
        let mut loss_sum = 0.0;
        let mut targets = 0;
        if let Some((logits, y)) = &fz.const_row {
            if logits.len() != vocab || *y as usize >= vocab {
                bail!(
                    "vector gradient: expected a constant row of V = {vocab} logits and a target below it, found {} logits and target {y}",
                    logits.len()
                );
            }
            loss_sum += row_loss(logits, *y as usize, coldness);
            targets += 1;
        }
        if fz.predict.is_empty() {
            return Ok(LossGrad {
                loss_sum,
                targets,
                grad_sum: vec![0.0; d],
            });
        }
        if fz.h_l.len() != ta * d {
            bail!(
                "vector gradient: expected h_L of [Ta={ta}, D={d}], found {} values",
                fz.h_l.len()
            );
        }
        if fz.k_pre.len() != nl || fz.v_pre.len() != nl {
            bail!(
                "vector gradient: expected prefix K/V for {nl} blocks, found {} and {}",
                fz.k_pre.len(),
                fz.v_pre.len()
            );
        }
        for kv in fz.k_pre.iter().chain(&fz.v_pre) {
            if kv.len() != s0 * kvd {
                bail!(
                    "vector gradient: expected prefix K/V of [S0={s0}, {kvd}], found {} values",
                    kv.len()
                );
            }
        }
        if let Some(&r) = fz.steer_rows.iter().find(|&&r| r >= ta) {
            bail!("vector gradient: steer row {r} is not below Ta = {ta}");
        }
        if let Some(&(r, y)) = fz
            .predict
            .iter()
            .find(|&&(r, y)| r >= ta || y as usize >= vocab)
        {
            bail!(
                "vector gradient: predict row {r} / target {y} not below Ta = {ta} / V = {vocab}"
            );
        }
        if fz.steer_rows.len() > i32::MAX as usize || ta > i32::MAX as usize {
            bail!("vector gradient: {ta} active rows do not fit in int32");
        }

        self.ensure(Dims {
            ta,
            s: s0 + ta,
            nl,
            steer: fz.steer_rows.len(),
        })?;
        let gpu: &Gpu = &self.gpu;
        let st = &gpu.stream;
        let w: &CudaWeights = &self.w;
        let eps = c.rms_norm_eps;
        let b = self.bufs.as_mut().expect("ensured above");
        let hb = &mut self.head;
        let part = &mut self.part;
        let up = cuda_err("uploading an example");
        let attn = VgAttn {
            ta,
            s0,
            h: nh,
            hkv: nkv,
            dh: hd,
            ld: qkvw,
        };

        // Inputs: h = h_L; the prefix K/V per block; steer rows; v and extra.
        st.memcpy_htod(&fz.h_l, &mut b.h.slice_mut(..ta * d))
            .map_err(up)?;
        for i in 0..nl {
            let o = i * s0 * kvd;
            if s0 > 0 {
                st.memcpy_htod(&fz.k_pre[i], &mut b.k_pre.slice_mut(o..o + s0 * kvd))
                    .map_err(cuda_err("uploading the prefix keys"))?;
                st.memcpy_htod(&fz.v_pre[i], &mut b.v_pre.slice_mut(o..o + s0 * kvd))
                    .map_err(cuda_err("uploading the prefix values"))?;
            }
        }
        let steer: Vec<i32> = fz.steer_rows.iter().map(|&r| r as i32).collect();
        let ns = steer.len();
        if ns > 0 {
            st.memcpy_htod(&steer, &mut b.steer.slice_mut(..ns))
                .map_err(cuda_err("uploading the steer rows"))?;
        }
        st.memcpy_htod(v, &mut hb.v.slice_mut(..))
            .map_err(cuda_err("uploading v"))?;
        if let Some(e) = extra {
            st.memcpy_htod(e, &mut hb.extra.slice_mut(..))
                .map_err(cuda_err("uploading extra"))?;
        }

        // h[steer] += v + extra                                                      [Ta, D]
        k::vg_steer_rows(
            gpu,
            &mut b.h.slice_mut(..ta * d),
            &mut hb.v.slice_mut(..),
            extra.map(|_| hb.extra.slice(..)).as_ref(),
            &b.steer.slice(..ns),
            d,
            true,
        )?;

        // Forward of blocks L+1..N−1, saving what the backward reads.
        for i in 0..nl {
            let lw = &w.layers[fz.layer + 1 + i];
            let (od, o1, oq, oh, of) = (
                i * ta * d,
                i * ta,
                i * ta * qkvw,
                i * ta * nh,
                i * ta * 2 * f,
            );
            let okv = i * s0 * kvd;
            st.memcpy_dtod(&b.h.slice(..ta * d), &mut b.h_in.slice_mut(od..od + ta * d))
                .map_err(cuda_err("saving h_in"))?;
            // xn = rmsnorm(h)                                                        [Ta, D]
            k::vg_rmsnorm_fwd(
                gpu,
                &mut b.xn.slice_mut(..ta * d),
                &mut b.r1.slice_mut(o1..o1 + ta),
                &b.h.slice(..ta * d),
                &lw.input_layernorm.as_view(),
                ta,
                eps,
            )?;
            // qkv = xn·Wqkvᵀ + b                                                     [Ta, QKV]
            k::vg_mm(
                gpu,
                &mut b.qkv.slice_mut(oq..oq + ta * qkvw),
                &b.xn.slice(..ta * d),
                &lw.qkv_proj.as_view(),
                lw.qkv_bias.as_ref().map(|x| x.as_view()).as_ref(),
                Mm::nt(ta, qkvw, d),
                Some(&mut part.slice_mut(..)),
            )?;
            // rope over the q and k heads (contiguous: H + Hkv heads)
            k::vg_rope(
                gpu,
                &mut b.qkv.slice_mut(oq..oq + ta * qkvw),
                &self.inv_freq.as_view(),
                ta,
                nh + nkv,
                qkvw,
                s0,
                false,
            )?;
            // a = attention                                                         [Ta, H·Dh]
            k::vg_attn_fwd(
                gpu,
                &mut b.a.slice_mut(..ta * qd),
                &mut b.lse.slice_mut(oh..oh + ta * nh),
                &mut b.sc.slice_mut(..),
                &b.qkv.slice(oq..oq + ta * qkvw),
                &b.k_pre.slice(okv..okv + s0 * kvd),
                &b.v_pre.slice(okv..okv + s0 * kvd),
                attn,
            )?;
            // h += a·Woᵀ                                                             [Ta, D]
            k::vg_mm(
                gpu,
                &mut b.h.slice_mut(..ta * d),
                &b.a.slice(..ta * qd),
                &lw.o_proj.as_view(),
                None,
                Mm::nt(ta, d, qd).acc(),
                Some(&mut part.slice_mut(..)),
            )?;
            st.memcpy_dtod(
                &b.h.slice(..ta * d),
                &mut b.h_mid.slice_mut(od..od + ta * d),
            )
            .map_err(cuda_err("saving h_mid"))?;
            k::vg_rmsnorm_fwd(
                gpu,
                &mut b.xn.slice_mut(..ta * d),
                &mut b.r2.slice_mut(o1..o1 + ta),
                &b.h.slice(..ta * d),
                &lw.post_attention_layernorm.as_view(),
                ta,
                eps,
            )?;
            // gu = xn·Wguᵀ                                                           [Ta, 2F]
            k::vg_mm(
                gpu,
                &mut b.gu.slice_mut(of..of + ta * 2 * f),
                &b.xn.slice(..ta * d),
                &lw.gate_up_proj.as_view(),
                None,
                Mm::nt(ta, 2 * f, d),
                Some(&mut part.slice_mut(..)),
            )?;
            k::vg_silu_mul_fwd(
                gpu,
                &mut b.act.slice_mut(..ta * f),
                &b.gu.slice(of..of + ta * 2 * f),
                ta,
                f,
            )?;
            // h += act·Wdᵀ                                                           [Ta, D]
            k::vg_mm(
                gpu,
                &mut b.h.slice_mut(..ta * d),
                &b.act.slice(..ta * f),
                &lw.down_proj.as_view(),
                None,
                Mm::nt(ta, d, f).acc(),
                Some(&mut part.slice_mut(..)),
            )?;
        }

        // Head and loss by chunks of predicting rows; dh collects d(loss)/d h_N.      [Ta, D]
        let lm = w.lm_head.as_ref().unwrap_or(&w.embed_tokens);
        st.memset_zeros(&mut b.dh.slice_mut(..ta * d))
            .map_err(cuda_err("clearing dh"))?;
        for chunk in fz.predict.chunks(HEAD_CHUNK) {
            let rc = chunk.len();
            let rows: Vec<i32> = chunk.iter().map(|&(r, _)| r as i32).collect();
            let ys: Vec<i32> = chunk.iter().map(|&(_, y)| y as i32).collect();
            st.memcpy_htod(&rows, &mut hb.rows.slice_mut(..rc))
                .map_err(cuda_err("uploading predict rows"))?;
            st.memcpy_htod(&ys, &mut hb.y.slice_mut(..rc))
                .map_err(cuda_err("uploading targets"))?;
            // x = h[R]                                                               [R, D]
            k::vg_rows(
                gpu,
                &mut hb.x.slice_mut(..rc * d),
                &b.h.slice(..ta * d),
                &hb.rows.slice(..rc),
                d,
                false,
            )?;
            k::vg_rmsnorm_fwd(
                gpu,
                &mut hb.xn.slice_mut(..rc * d),
                &mut hb.rn.slice_mut(..rc),
                &hb.x.slice(..rc * d),
                &w.norm.as_view(),
                rc,
                eps,
            )?;
            // z = xn·W_lmᵀ                                                           [R, V]
            k::vg_mm(
                gpu,
                &mut hb.z.slice_mut(..rc * vocab),
                &hb.xn.slice(..rc * d),
                &lm.as_view(),
                None,
                Mm::nt(rc, vocab, d),
                Some(&mut part.slice_mut(..)),
            )?;
            k::vg_xent(
                gpu,
                &mut hb.z.slice_mut(..rc * vocab),
                &mut hb.loss.slice_mut(..rc),
                &hb.y.slice(..rc),
                vocab,
                coldness,
                want_grad,
            )?;
            let losses = st
                .clone_dtoh(&hb.loss.slice(..rc))
                .map_err(cuda_err("downloading losses"))?;
            loss_sum += losses.iter().map(|&x| x as f64).sum::<f64>();
            targets += rc;
            if !want_grad {
                continue;
            }
            // dxn = dz·W_lm                                                          [R, D]
            k::vg_mm(
                gpu,
                &mut hb.dxn.slice_mut(..rc * d),
                &hb.z.slice(..rc * vocab),
                &lm.as_view(),
                None,
                Mm::nn(rc, d, vocab),
                Some(&mut part.slice_mut(..)),
            )?;
            st.memset_zeros(&mut hb.dx.slice_mut(..rc * d))
                .map_err(cuda_err("clearing dx"))?;
            k::vg_rmsnorm_bwd(
                gpu,
                &mut hb.dx.slice_mut(..rc * d),
                &hb.dxn.slice(..rc * d),
                &hb.x.slice(..rc * d),
                &hb.rn.slice(..rc),
                &w.norm.as_view(),
                rc,
            )?;
            k::vg_rows(
                gpu,
                &mut b.dh.slice_mut(..ta * d),
                &hb.dx.slice(..rc * d),
                &hb.rows.slice(..rc),
                d,
                true,
            )?;
        }

        if !want_grad {
            return Ok(LossGrad {
                loss_sum,
                targets,
                grad_sum: vec![0.0; d],
            });
        }
        // Backward of the blocks, in reverse; dh goes from d/dh_out to d/dh_in in place.
        for i in (0..nl).rev() {
            let lw = &w.layers[fz.layer + 1 + i];
            let (od, o1, oq, oh, of) = (
                i * ta * d,
                i * ta,
                i * ta * qkvw,
                i * ta * nh,
                i * ta * 2 * f,
            );
            let okv = i * s0 * kvd;
            // dact = dh·Wd                                                           [Ta, F]
            k::vg_mm(
                gpu,
                &mut b.act.slice_mut(..ta * f),
                &b.dh.slice(..ta * d),
                &lw.down_proj.as_view(),
                None,
                Mm::nn(ta, f, d),
                Some(&mut part.slice_mut(..)),
            )?;
            k::vg_silu_mul_bwd(
                gpu,
                &mut b.dgu.slice_mut(..ta * 2 * f),
                &b.act.slice(..ta * f),
                &b.gu.slice(of..of + ta * 2 * f),
                ta,
                f,
            )?;
            // dxn = dgu·Wgu                                                          [Ta, D]
            k::vg_mm(
                gpu,
                &mut b.xn.slice_mut(..ta * d),
                &b.dgu.slice(..ta * 2 * f),
                &lw.gate_up_proj.as_view(),
                None,
                Mm::nn(ta, d, 2 * f),
                Some(&mut part.slice_mut(..)),
            )?;
            k::vg_rmsnorm_bwd(
                gpu,
                &mut b.dh.slice_mut(..ta * d),
                &b.xn.slice(..ta * d),
                &b.h_mid.slice(od..od + ta * d),
                &b.r2.slice(o1..o1 + ta),
                &lw.post_attention_layernorm.as_view(),
                ta,
            )?;
            // da = dh·Wo                                                             [Ta, H·Dh]
            k::vg_mm(
                gpu,
                &mut b.a.slice_mut(..ta * qd),
                &b.dh.slice(..ta * d),
                &lw.o_proj.as_view(),
                None,
                Mm::nn(ta, qd, d),
                Some(&mut part.slice_mut(..)),
            )?;
            // dqkv = attention backward                                              [Ta, QKV]
            k::vg_attn_bwd(
                gpu,
                &mut b.dqkv.slice_mut(..ta * qkvw),
                &mut b.sc.slice_mut(..),
                &mut b.ds.slice_mut(..),
                &b.a.slice(..ta * qd),
                &b.lse.slice(oh..oh + ta * nh),
                &b.qkv.slice(oq..oq + ta * qkvw),
                &b.k_pre.slice(okv..okv + s0 * kvd),
                &b.v_pre.slice(okv..okv + s0 * kvd),
                attn,
            )?;
            k::vg_rope(
                gpu,
                &mut b.dqkv.slice_mut(..ta * qkvw),
                &self.inv_freq.as_view(),
                ta,
                nh + nkv,
                qkvw,
                s0,
                true,
            )?;
            // dxn = dqkv·Wqkv                                                        [Ta, D]
            k::vg_mm(
                gpu,
                &mut b.xn.slice_mut(..ta * d),
                &b.dqkv.slice(..ta * qkvw),
                &lw.qkv_proj.as_view(),
                None,
                Mm::nn(ta, d, qkvw),
                Some(&mut part.slice_mut(..)),
            )?;
            k::vg_rmsnorm_bwd(
                gpu,
                &mut b.dh.slice_mut(..ta * d),
                &b.xn.slice(..ta * d),
                &b.h_in.slice(od..od + ta * d),
                &b.r1.slice(o1..o1 + ta),
                &lw.input_layernorm.as_view(),
                ta,
            )?;
        }

        // grad = Σ_{r ∈ steer} dh[r]                                                 [D]
        k::vg_steer_rows(
            gpu,
            &mut b.dh.slice_mut(..ta * d),
            &mut hb.v.slice_mut(..),
            None,
            &b.steer.slice(..ns),
            d,
            false,
        )?;
        let grad_sum = st
            .clone_dtoh(&hb.v.slice(..))
            .map_err(cuda_err("downloading the gradient"))?;
        Ok(LossGrad {
            loss_sum,
            targets,
            grad_sum,
        })
    }
}

/// Cross-entropy of softmax(c·z) at y for the constant row, in f32 as the CPU reference forms
/// it (`vector_grad::grad` with F = f32), returned as f64.
fn row_loss(z: &[f32], y: usize, cold: f32) -> f64 {
    let mut max = f32::NEG_INFINITY;
    for &x in z {
        max = max.max(cold * x);
    }
    let mut sum = 0f32;
    for &x in z {
        sum += (cold * x - max).exp();
    }
    (max + sum.ln() - cold * z[y]) as f64
}
