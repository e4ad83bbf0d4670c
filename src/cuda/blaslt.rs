//! cuBLASLt for the large products (prefill chunks, the hybrid step's candidate rows), with the
//! contract of `kernels::gemm`: out f32 [N, M] = x bf16 [N, K] · W bf16 [M, K]ᵀ, f32 accumulation.
//! Issue 3 allows NVIDIA's library where it beats our gemm for large products; until a GPU run
//! has compared the two (PERFORMANCE.md) it is opt-in: THINKSTEER_GEMM=lt.
//!
//! cuBLASLt is column-major. Row-major out [N, M] is column-major outᵀ (M × N, ld M) = op(A)·B
//! with A = W read column-major as K × M (ld K) and transposed, and B = x read column-major as
//! K × N (ld K), not transposed.
//!
//! The library is loaded at first use (dynamic loading), so a machine without libcublasLt gets a
//! clear error instead of a panic. One plan per shape (descriptor, layouts, the heuristic's
//! algorithm), made by the first call of that shape; the decode and hybrid graphs make their first
//! call eagerly before capturing, so capture only records the matmul.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{cuda_err, Gpu};
use crate::error::{Error, Result};

/// Workspace bytes (NVIDIA's recommendation for Hopper).
const WORKSPACE: usize = 32 << 20;

/// The cuBLASLt objects of one (N, M, K).
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<(usize, usize, usize), Plan>>,
}

// SAFETY: the handle and the plans are opaque cuBLASLt objects that cuBLASLt allows to be used
// from any thread; here they are reached only through &self, the plan table behind a mutex, and
// every matmul is issued on the Gpu's one stream.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

fn lt_err(what: &str) -> impl FnOnce(lt::CublasError) -> Error + '_ {
    move |e| Error::Cuda(format!("cuBLASLt, {what}: {e:?}"))
}

impl BlasLt {
    pub fn new(gpu: &Gpu) -> Result<BlasLt> {
        // SAFETY: only tries to load the shared library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(
                "THINKSTEER_GEMM=lt: libcublasLt could not be loaded (it ships with the CUDA toolkit's cuBLAS; put its folder on LD_LIBRARY_PATH)".into(),
            ));
        }
        gpu.bind()?; // cuBLASLt works in the current context
        let handle = lt::create_handle().map_err(lt_err("creating a handle"))?;
        let workspace = gpu
            .stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(cuda_err("allocating the cuBLASLt workspace"))?;
        Ok(BlasLt {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, n: usize, m: usize, k: usize) -> Result<Plan> {
        let (f32t, bf16t) = (
            sys::cudaDataType_t::CUDA_R_32F,
            sys::cudaDataType_t::CUDA_R_16BF,
        );
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)
            .map_err(lt_err("creating the matmul descriptor"))?;
        let transpose: i32 = 1;
        // SAFETY: TRANSA takes a 4-byte cublasOperation_t; 1 is CUBLAS_OP_T.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose) as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
        }
        .map_err(lt_err("setting transa"))?;
        let (mu, nu, ku) = (m as u64, n as u64, k as u64);
        let a = lt::create_matrix_layout(bf16t, ku, mu, k as i64).map_err(lt_err("layout of W"))?;
        let b = lt::create_matrix_layout(bf16t, ku, nu, k as i64).map_err(lt_err("layout of x"))?;
        let c =
            lt::create_matrix_layout(f32t, mu, nu, m as i64).map_err(lt_err("layout of out"))?;
        let pref = lt::create_matmul_pref().map_err(lt_err("creating preferences"))?;
        let ws = WORKSPACE;
        // The host guarantees 16-byte alignment only (the default asks for 256).
        let align: u32 = 16;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let aligns = [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ];
        // SAFETY: MAX_WORKSPACE_BYTES takes a u64 (usize on 64-bit targets) and the
        // MIN_ALIGNMENT attributes a u32, each passed with its size; the heuristic reads the
        // objects created above, all alive; pref is destroyed once, here.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| {
                aligns.iter().try_for_each(|&attr| {
                    lt::set_matmul_pref_attribute(
                        pref,
                        attr,
                        (&align) as *const u32 as *const c_void,
                        std::mem::size_of::<u32>(),
                    )
                })
            })
            .and_then(|_| lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref))
            .and_then(|h| lt::destroy_matmul_pref(pref).map(|_| h))
        }
        .map_err(lt_err(&format!(
            "choosing an algorithm for N {n}, M {m}, K {k}"
        )))?;
        Ok(Plan {
            desc,
            a,
            b,
            c,
            algo: heuristic.algo,
        })
    }

    /// out f32 [N, M] = x bf16 [N, K] · W bf16 [M, K]ᵀ (lengths checked by the caller).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        gpu: &Gpu,
        out: &mut CudaViewMut<'_, f32>,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        n: usize,
        m: usize,
        k: usize,
    ) -> Result<()> {
        gpu.bind()?;
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let p = match plans.entry((n, m, k)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(n, m, k)?),
        };
        let st = &gpu.stream;
        let (alpha, beta) = (1f32, 0f32);
        let (wp, _rw) = w.device_ptr(st);
        let (xp, _rx) = x.device_ptr(st);
        let (op, _ro) = out.device_ptr_mut(st);
        let (ws, _rws) = self.workspace.device_ptr(st);
        // SAFETY: A = W spans K·M bf16, B = x K·N bf16, C = D = out M·N f32 (checked by the
        // caller, `kernels::gemm`); the plan's layouts say exactly these shapes; beta = 0 so C is
        // not read; the workspace holds WORKSPACE bytes, the size the heuristic was given.
        unsafe {
            lt::matmul(
                self.handle,
                p.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                wp as *const c_void,
                p.a,
                xp as *const c_void,
                p.b,
                op as *const c_void,
                p.c,
                op as *mut c_void,
                p.c,
                &p.algo,
                ws as *mut c_void,
                WORKSPACE,
                st.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(lt_err("matmul"))?;
        gpu.launched("cublasLtMatmul", Ok::<(), cudarc::driver::DriverError>(()))
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each object was created once in `plan` and is destroyed once, here. Errors on
        // teardown have nowhere to go.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: the handle was created once in `new`; its plans are gone.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
