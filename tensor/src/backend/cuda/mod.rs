//! The CUDA backend: NVIDIA GPUs through cudarc, the driver, cuBLAS and
//! NVRTC loaded at run time (building needs no CUDA toolkit; a host without
//! the driver simply has no CUDA devices). Products of float weights and
//! activations run in cuBLAS; the other kernels are `kernels.cu`, compiled
//! by NVRTC for the device's architecture when the backend starts.
//!
//! Weights stay in the model file's format on the device (f16, bf16 and
//! GGUF's blocks, K-quants included) and are decoded inside the kernels, so
//! a quantised model takes its file's size in device memory. An
//! allocation the device refuses is an [`Error::TooLarge`] for that call.

use super::{
    Activation, Array, AttentionSpec, Backend, DeviceInfo, DeviceKind, DeviceMemory, HostData, HostWeight, RopeSpec, Weight,
    WeightFormat, CachedAttention, KvCache, MatmulDims, check_attention, check_cached_attention, check_elementwise, check_linear, check_matmul,
    check_rope, check_rows, check_values, check_write_kv,
};
use crate::error::{Error, invalid_input};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchArgs, LaunchConfig, PushKernelArg, sys};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The kernels' source.
const KERNELS: &str = include_str!("kernels.cu");

/// The kernels of `kernels.cu`, by name.
pub const KERNEL_NAMES: [&str; 11] =
    ["linear_encoded", "gather", "unary", "binary", "normalise", "softmax", "attention", "rope", "add_bias", "scatter_rows", "cached_attention"];

/// Compiles the kernels to PTX for `arch` (`compute_90` for an H100 or
/// H200); NVRTC must be loadable. The backend does this when it starts;
/// tests call it to check the kernels compile on machines without a GPU.
pub fn compile(arch: &str) -> Result<Ptx, Error> {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Unsupported("NVRTC (libnvrtc.so.12) is not installed or not on LD_LIBRARY_PATH".into()));
    }
    let options = CompileOptions { options: vec![format!("--gpu-architecture={arch}")], ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(KERNELS, options).map_err(|e| match e {
        CompileError::CompileError { log, .. } => Error::Unsupported(format!("NVRTC refused the kernels: {}", log.to_string_lossy())),
        other => Error::Unsupported(format!("NVRTC failed: {other:?}")),
    })
}

/// Device memory, counted while it lives.
struct Memory {
    slice: Slice,
    bytes: u64,
    allocated: Arc<AtomicU64>,
}

enum Slice {
    F32(CudaSlice<f32>),
    Bytes(CudaSlice<u8>),
}

impl Drop for Memory {
    fn drop(&mut self) {
        self.allocated.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl DeviceMemory for Memory {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn driver(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| match e.0 {
        sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Error::TooLarge(format!("the GPU is out of memory for {what}")),
        _ => Error::Unsupported(format!("CUDA failed at {what}: {e:?}")),
    }
}

/// An NVIDIA GPU and its kernels.
pub struct CudaBackend {
    info: DeviceInfo,
    stream: Arc<CudaStream>,
    /// cuBLAS handles are not to be used by two threads at once.
    blas: Mutex<CudaBlas>,
    kernels: Vec<CudaFunction>,
    allocated: Arc<AtomicU64>,
}

impl CudaBackend {
    /// A backend on every CUDA device, or why there is none (no driver, no
    /// device, NVRTC or cuBLAS missing).
    pub fn all() -> Result<Vec<CudaBackend>, String> {
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no NVIDIA driver (libcuda.so)".into());
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err("the NVIDIA driver is here but cuBLAS (libcublas.so.12) is not".into());
        }
        let count = CudaContext::device_count().map_err(|e| format!("the driver found no device: {e:?}"))?;
        if count == 0 {
            return Err("the driver found no device".into());
        }
        // Devices that fail to start are left out, with the reason logged
        // by the caller when none is left.
        let mut found = Vec::new();
        let mut failed = Vec::new();
        for ordinal in 0..count as usize {
            match CudaBackend::new(ordinal, count > 1) {
                Ok(backend) => found.push(backend),
                Err(e) => failed.push(format!("device {ordinal}: {e}")),
            }
        }
        match found.is_empty() {
            true => Err(failed.join("; ")),
            false => Ok(found),
        }
    }

    /// Device `ordinal`; its name carries the ordinal when there are
    /// several (`NVIDIA H200 (cuda:1)`), so every device has its own.
    fn new(ordinal: usize, several: bool) -> Result<CudaBackend, Error> {
        let ctx = CudaContext::new(ordinal).map_err(driver("opening the device"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver("reading the compute capability"))?;
        let ptx = compile(&format!("compute_{major}{minor}"))?;
        let module = ctx.load_module(ptx).map_err(driver("loading the kernels"))?;
        let kernels = KERNEL_NAMES.iter().map(|n| module.load_function(n).map_err(driver(n))).collect::<Result<Vec<_>, _>>()?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Unsupported(format!("cuBLAS failed to start: {e:?}")))?;
        let mut name = ctx.name().map_err(driver("reading the device's name"))?;
        if several {
            name = format!("{name} (cuda:{ordinal})");
        }
        let memory = ctx.total_mem().map_err(driver("reading the device's memory"))?;
        Ok(CudaBackend {
            info: DeviceInfo {
                kind: DeviceKind::Cuda,
                name,
                driver: format!("CUDA, compute capability {major}.{minor}"),
                memory_bytes: Some(memory as u64),
                f16: true,
            },
            stream,
            blas: Mutex::new(blas),
            kernels,
            allocated: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Bytes of device memory this backend holds now.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    fn kernel(&self, name: &str) -> &CudaFunction {
        &self.kernels[KERNEL_NAMES.iter().position(|n| *n == name).expect("a kernel of kernels.cu")]
    }

    fn count<T: DeviceRepr>(&self, slice: CudaSlice<T>, wrap: fn(CudaSlice<T>) -> Slice) -> Memory {
        let bytes = slice.num_bytes() as u64;
        self.allocated.fetch_add(bytes, Ordering::Relaxed);
        Memory { slice: wrap(slice), bytes, allocated: self.allocated.clone() }
    }

    fn floats(&self, shape: Vec<usize>, values: &[f32]) -> Result<Array, Error> {
        let slice = self.stream.clone_htod(values).map_err(driver("an upload"))?;
        Ok(Array::device(shape, Box::new(self.count(slice, Slice::F32))))
    }

    /// Device memory for an output of `n` values (at least one: CUDA has
    /// no empty allocations), zeroed. Kernels index with 32-bit counts.
    fn output(&self, n: usize) -> Result<CudaSlice<f32>, Error> {
        if n > i32::MAX as usize {
            return Err(Error::TooLarge(format!("an output of {n} values on CUDA (2^31 at most)")));
        }
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(driver("an output"))
    }

    /// An output, once its kernel is launched, as an array of `shape`.
    fn array(&self, shape: Vec<usize>, slice: CudaSlice<f32>) -> Array {
        Array::device(shape, Box::new(self.count(slice, Slice::F32)))
    }

    /// A launch of kernel `name`, its arguments to push.
    fn call(&self, name: &'static str) -> (LaunchArgs<'_>, &'static str) {
        (self.stream.launch_builder(self.kernel(name)), name)
    }
}

/// Launches a kernel whose arguments were pushed.
///
/// Safety: the arguments are those of the kernel in kernels.cu, in order,
/// with the sizes it reads checked by the caller.
unsafe fn launch((mut args, name): (LaunchArgs<'_>, &str), config: LaunchConfig) -> Result<(), Error> {
    unsafe { args.launch(config) }.map(|_| ()).map_err(driver(name))
}

fn f32s(a: &Array) -> Result<&CudaSlice<f32>, Error> {
    match &a.device_memory::<Memory>()?.slice {
        Slice::F32(s) => Ok(s),
        Slice::Bytes(_) => Err(invalid_input("an encoded buffer where floats are needed")),
    }
}

fn weight_f32(w: &Weight) -> Result<&CudaSlice<f32>, Error> {
    match &w.device_memory::<Memory>()?.slice {
        Slice::F32(s) if w.format == WeightFormat::F32 => Ok(s),
        _ => Err(invalid_input(format!("a {:?} weight where floats are needed", w.format))),
    }
}

/// The code of kernels.cu's `value_at` for a format.
fn format_code(format: WeightFormat) -> i32 {
    match format {
        WeightFormat::F32 => 0,
        WeightFormat::F16 => 1,
        WeightFormat::BF16 => 2,
        WeightFormat::Q4_0 => 3,
        WeightFormat::Q4_1 => 4,
        WeightFormat::Q8_0 => 5,
        WeightFormat::Q4K => 6,
        WeightFormat::Q5K => 7,
        WeightFormat::Q6K => 8,
    }
}

/// One thread per item, 256 a block.
fn per_item(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// One block of `threads` per row.
fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

impl Backend for CudaBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn upload(&self, shape: Vec<usize>, values: Vec<f32>) -> Result<Array, Error> {
        check_values(&shape, values.len())?;
        self.floats(shape, &values)
    }

    fn download(&self, array: &Array) -> Result<Vec<f32>, Error> {
        let mut values = self.stream.clone_dtoh(f32s(array)?).map_err(driver("a download"))?;
        self.stream.synchronize().map_err(driver("a download"))?;
        values.truncate(array.len());
        Ok(values)
    }

    fn weight(&self, weight: HostWeight) -> Result<Weight, Error> {
        let weight = weight.vectors_as_floats();
        let (rows, cols, format) = (weight.rows, weight.cols, weight.format());
        let memory = match &weight.data {
            HostData::F32(values) => self.count(self.stream.clone_htod(values).map_err(driver("a weight"))?, Slice::F32),
            HostData::Encoded(_, bytes) => self.count(self.stream.clone_htod(bytes).map_err(driver("a weight"))?, Slice::Bytes),
        };
        Ok(Weight::device(rows, cols, format, Box::new(memory)))
    }

    fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Array, Error> {
        let cols = table.cols;
        let row_bytes = table.format.row_bytes(cols).ok_or_else(|| invalid_input(format!("{cols} columns of {:?}", table.format)))?;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(invalid_input(format!("token id {id} outside the vocabulary of {}", table.rows)));
        }
        let n = ids.len() * cols;
        let mut y = self.output(n)?;
        if n > 0 {
            let ids = self.stream.clone_htod(ids).map_err(driver("token ids"))?;
            let args = (n as i32, cols as i32, format_code(table.format), row_bytes as i32);
            let memory = table.device_memory::<Memory>()?;
            let mut b = self.call("gather");
            match &memory.slice {
                Slice::F32(s) => b.0.arg(s),
                Slice::Bytes(s) => b.0.arg(s),
            };
            b.0.arg(&ids).arg(&mut y).arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3);
            // Safety: the arguments of `gather`, sizes checked above.
            unsafe { launch(b, per_item(n)) }?;
        }
        Ok(self.array(vec![ids.len(), cols], y))
    }

    fn linear(&self, x: &Array, w: &Weight, bias: Option<&Weight>) -> Result<Array, Error> {
        let (rows, cols, out) = check_linear(x, w, bias)?;
        let mut y = self.output(rows * out)?;
        if rows * out == 0 || cols == 0 {
            // Nothing to compute (an empty product is the zeros of `output`).
            if let Some(bias) = bias.filter(|_| rows * out > 0) {
                return self.add_row(&self.array(vec![rows, out], y), bias);
            }
            return Ok(self.array(vec![rows, out], y));
        }
        let xs = f32s(x)?;
        let bias = bias.map(weight_f32).transpose()?;
        if w.format == WeightFormat::F32 {
            // Row-major y = x·wᵀ is column-major yᵀ = w·xᵀ: w transposed.
            let config = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: out as i32,
                n: rows as i32,
                k: cols as i32,
                alpha: 1.0f32,
                lda: cols as i32,
                ldb: cols as i32,
                beta: 0.0f32,
                ldc: out as i32,
            };
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            // Safety: check_linear checked w holds out·cols values, x rows·cols, y rows·out.
            unsafe { blas.gemm(config, weight_f32(w)?, xs, &mut y) }.map_err(blas_error)?;
            drop(blas);
            if let Some(bias) = bias {
                let (n, c) = ((rows * out) as i32, out as i32);
                let mut b = self.call("add_bias");
                b.0.arg(&mut y).arg(bias).arg(&n).arg(&c);
                // Safety: the arguments of `add_bias`, sizes checked above.
                unsafe { launch(b, per_item(rows * out)) }?;
            }
        } else {
            let row_bytes = w.format.row_bytes(cols).ok_or_else(|| invalid_input(format!("{cols} columns of {:?}", w.format)))?;
            let Slice::Bytes(ws) = &w.device_memory::<Memory>()?.slice else {
                return Err(invalid_input("a weight of floats marked as encoded"));
            };
            let none = self.output(1)?;
            let args = (rows as i32, cols as i32, out as i32, format_code(w.format), row_bytes as i32, bias.is_some() as i32);
            if rows > 65535 {
                return Err(invalid_input(format!("{rows} rows at once by an encoded weight on CUDA (65535 at most)")));
            }
            let config = LaunchConfig { grid_dim: (out.div_ceil(8) as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let mut b = self.call("linear_encoded");
            b.0.arg(xs).arg(ws).arg(bias.unwrap_or(&none)).arg(&mut y);
            b.0.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4).arg(&args.5);
            // Safety: the arguments of `linear_encoded`, sizes checked above.
            unsafe { launch(b, config) }?;
        }
        Ok(self.array(vec![rows, out], y))
    }

    fn matmul(&self, a: &Array, b: &Array, transpose_b: bool, alpha: f32) -> Result<Array, Error> {
        let MatmulDims { batch, b_batched, m, k, n, shape } = check_matmul(a, b, transpose_b)?;
        let mut y = self.output(batch * m * n)?;
        if batch * m * n > 0 && k > 0 {
            // Row-major c = a·b is column-major cᵀ = bᵀ·aᵀ.
            let config = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: if transpose_b { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N },
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: n as i32,
                    n: m as i32,
                    k: k as i32,
                    alpha,
                    lda: if transpose_b { k as i32 } else { n as i32 },
                    ldb: k as i32,
                    beta: 0.0,
                    ldc: n as i32,
                },
                batch_size: batch as i32,
                stride_a: if b_batched { (k * n) as i64 } else { 0 },
                stride_b: (m * k) as i64,
                stride_c: (m * n) as i64,
            };
            let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
            // Safety: check_matmul checked the shapes; a stride of 0 reuses one b for every batch.
            unsafe { blas.gemm_strided_batched(config, f32s(b)?, f32s(a)?, &mut y) }.map_err(blas_error)?;
        }
        Ok(self.array(shape, y))
    }

    fn add(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        let broadcast = check_elementwise(a, b)?;
        self.binary(a, f32s(b)?, broadcast, 0)
    }

    fn mul(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        let broadcast = check_elementwise(a, b)?;
        self.binary(a, f32s(b)?, broadcast, 1)
    }

    fn add_row(&self, x: &Array, row: &Weight) -> Result<Array, Error> {
        if row.rows * row.cols != x.matrix().1 {
            return Err(invalid_input(format!("adding a row of {} to {:?}", row.cols, x.shape())));
        }
        self.binary(x, weight_f32(row)?, true, 0)
    }

    fn layer_norm(&self, x: &Array, gamma: &Weight, beta: &Weight, eps: f32) -> Result<Array, Error> {
        self.norm(x, gamma, Some(beta), eps)
    }

    fn rms_norm(&self, x: &Array, gamma: &Weight, eps: f32) -> Result<Array, Error> {
        self.norm(x, gamma, None, eps)
    }

    fn activation(&self, x: &Array, f: Activation) -> Result<Array, Error> {
        let op: i32 = match f {
            Activation::Gelu => 0,
            Activation::GeluTanh => 1,
            Activation::Silu => 2,
            Activation::Relu => 3,
            Activation::Sigmoid => 4,
            Activation::Tanh => 5,
            Activation::Erf => 6,
        };
        let n = x.len();
        let mut y = self.output(n)?;
        if n > 0 {
            let (xs, count) = (f32s(x)?, n as i32);
            let mut b = self.call("unary");
            b.0.arg(xs).arg(&mut y).arg(&count).arg(&op);
            // Safety: the arguments of `unary`, sizes checked above.
            unsafe { launch(b, per_item(n)) }?;
        }
        Ok(self.array(x.shape().to_vec(), y))
    }

    fn softmax(&self, x: &Array) -> Result<Array, Error> {
        let (rows, cols) = x.matrix();
        let mut y = self.output(rows * cols)?;
        if rows * cols > 0 {
            let (xs, r, c) = (f32s(x)?, rows as i32, cols as i32);
            let mut b = self.call("softmax");
            b.0.arg(xs).arg(&mut y).arg(&r).arg(&c);
            // Safety: the arguments of `softmax`, sizes checked above.
            unsafe { launch(b, per_row(rows, 256)) }?;
        }
        Ok(self.array(x.shape().to_vec(), y))
    }

    fn attention(&self, q: &Array, k: &Array, v: &Array, spec: &AttentionSpec) -> Result<Array, Error> {
        let tokens = check_attention(q, k, v, spec)?;
        if spec.dim > 512 {
            return Err(Error::Unsupported(format!("attention heads of {} values on CUDA (512 at most)", spec.dim)));
        }
        let mut y = self.output(tokens * spec.heads * spec.dim)?;
        if tokens > 0 {
            let (mut starts, mut lens) = (Vec::with_capacity(tokens), Vec::with_capacity(tokens));
            let mut at = 0u32;
            for &len in &spec.lens {
                starts.extend(std::iter::repeat_n(at, len));
                lens.extend(std::iter::repeat_n(len as u32, len));
                at += len as u32;
            }
            let starts = self.stream.clone_htod(&starts).map_err(driver("attention"))?;
            let lens = self.stream.clone_htod(&lens).map_err(driver("attention"))?;
            let (qs, ks, vs) = (f32s(q)?, f32s(k)?, f32s(v)?);
            let args = (spec.heads as i32, spec.kv_heads as i32, spec.dim as i32, tokens as i32, spec.causal as i32, spec.scale);
            let config = LaunchConfig { grid_dim: (tokens as u32, spec.heads as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let mut b = self.call("attention");
            b.0.arg(qs).arg(ks).arg(vs).arg(&starts).arg(&lens).arg(&mut y);
            b.0.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4).arg(&args.5);
            // Safety: the arguments of `attention`, sizes checked above.
            unsafe { launch(b, config) }?;
        }
        Ok(self.array(vec![tokens, spec.heads * spec.dim], y))
    }

    fn rope(&self, x: &Array, positions: &[u32], spec: &RopeSpec) -> Result<Array, Error> {
        check_rope(x, positions, spec)?;
        let mut y = self.output(x.len())?;
        let n = positions.len() * spec.heads * (spec.dim - spec.rotated / 2);
        if n > 0 {
            let pos = self.stream.clone_htod(positions).map_err(driver("positions"))?;
            let xs = f32s(x)?;
            let args = (positions.len() as i32, spec.heads as i32, spec.dim as i32, spec.rotated as i32, spec.theta, spec.interleaved as i32);
            let mut b = self.call("rope");
            b.0.arg(xs).arg(&pos).arg(&mut y).arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4).arg(&args.5);
            // Safety: the arguments of `rope`, sizes checked above.
            unsafe { launch(b, per_item(n)) }?;
        }
        Ok(self.array(x.shape().to_vec(), y))
    }

    fn select_rows(&self, x: &Array, rows: &[u32]) -> Result<Array, Error> {
        check_rows(x, rows)?;
        let cols = x.matrix().1;
        let n = rows.len() * cols;
        let mut y = self.output(n)?;
        if n > 0 {
            let ids = self.stream.clone_htod(rows).map_err(driver("row ids"))?;
            // The gather kernel reads the array as a table of f32 rows.
            let args = (n as i32, cols as i32, format_code(WeightFormat::F32), (cols * 4) as i32);
            let mut b = self.call("gather");
            b.0.arg(f32s(x)?).arg(&ids).arg(&mut y).arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3);
            // Safety: the arguments of `gather`, sizes checked above.
            unsafe { launch(b, per_item(n)) }?;
        }
        Ok(self.array(vec![rows.len(), cols], y))
    }

    fn kv_cache(&self, slots: usize, width: usize) -> Result<KvCache, Error> {
        let zeros = || self.stream.alloc_zeros::<f32>((slots * width).max(1)).map_err(driver("a key/value cache"));
        let (keys, values) = (self.count(zeros()?, Slice::F32), self.count(zeros()?, Slice::F32));
        Ok(KvCache::device(slots, width, Box::new(keys), Box::new(values)))
    }

    fn write_kv(&self, cache: &mut KvCache, k: &Array, v: &Array, slots: &[u32]) -> Result<(), Error> {
        check_write_kv(cache, k, v, slots)?;
        let n = slots.len() * cache.width;
        if n == 0 {
            return Ok(());
        }
        let slot_ids = self.stream.clone_htod(slots).map_err(driver("cache slots"))?;
        let (keys, values) = cache.device_memory::<Memory>()?;
        let (count, width) = (n as i32, cache.width as i32);
        for (src, dst) in [(k, keys), (v, values)] {
            let Slice::F32(dst) = &dst.slice else { return Err(invalid_input("a cache of bytes")) };
            let mut b = self.call("scatter_rows");
            // The kernel writes through a pointer the cache holds; cudarc
            // sees a shared reference, the stream orders the writes.
            b.0.arg(f32s(src)?).arg(&slot_ids).arg(dst).arg(&count).arg(&width);
            // Safety: the arguments of `scatter_rows`, slots checked above.
            unsafe { launch(b, per_item(n)) }?;
        }
        Ok(())
    }

    fn cached_attention(&self, q: &Array, cache: &KvCache, spec: &CachedAttention) -> Result<Array, Error> {
        let rows = check_cached_attention(q, cache, spec)?;
        if spec.dim > 512 {
            return Err(Error::Unsupported(format!("attention heads of {} values on CUDA (512 at most)", spec.dim)));
        }
        let mut y = self.output(rows * spec.heads * spec.dim)?;
        if rows > 0 {
            let (offsets, keys, slots) = spec.rows();
            let upload = |v: &[u32]| self.stream.clone_htod(v).map_err(driver("attention"));
            let (offsets, keys, slots) = (upload(&offsets)?, upload(&keys)?, upload(&slots)?);
            let (k, v) = cache.device_memory::<Memory>()?;
            let (Slice::F32(k), Slice::F32(v)) = (&k.slice, &v.slice) else { return Err(invalid_input("a cache of bytes")) };
            let args = (spec.heads as i32, spec.kv_heads as i32, spec.dim as i32, rows as i32, spec.scale);
            let config = LaunchConfig { grid_dim: (rows as u32, spec.heads as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let mut b = self.call("cached_attention");
            b.0.arg(f32s(q)?).arg(k).arg(v).arg(&offsets).arg(&keys).arg(&slots).arg(&mut y);
            b.0.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4);
            // Safety: the arguments of `cached_attention`, sizes checked above.
            unsafe { launch(b, config) }?;
        }
        Ok(self.array(vec![rows, spec.heads * spec.dim], y))
    }
}

fn blas_error(e: cudarc::cublas::result::CublasError) -> Error {
    Error::Unsupported(format!("cuBLAS failed: {e:?}"))
}

impl CudaBackend {
    fn binary(&self, a: &Array, b: &CudaSlice<f32>, broadcast: bool, op: i32) -> Result<Array, Error> {
        let n = a.len();
        let mut y = self.output(n)?;
        if n > 0 {
            let (xs, count, cols, broadcast) = (f32s(a)?, n as i32, a.matrix().1 as i32, broadcast as i32);
            let mut l = self.call("binary");
            l.0.arg(xs).arg(b).arg(&mut y).arg(&count).arg(&cols).arg(&broadcast).arg(&op);
            // Safety: the arguments of `binary`, sizes checked above.
            unsafe { launch(l, per_item(n)) }?;
        }
        Ok(self.array(a.shape().to_vec(), y))
    }

    fn norm(&self, x: &Array, gamma: &Weight, beta: Option<&Weight>, eps: f32) -> Result<Array, Error> {
        let (rows, cols) = x.matrix();
        if gamma.rows * gamma.cols != cols || beta.is_some_and(|b| b.rows * b.cols != cols) {
            return Err(invalid_input(format!("normalisation of {:?} with {} scales", x.shape(), gamma.cols)));
        }
        let mut y = self.output(rows * cols)?;
        if rows * cols > 0 {
            let g = weight_f32(gamma)?;
            // RMS normalisation reads no beta: gamma stands in for the argument.
            let be = beta.map(weight_f32).transpose()?.unwrap_or(g);
            let (xs, r, c, kind) = (f32s(x)?, rows as i32, cols as i32, beta.is_none() as i32);
            let mut b = self.call("normalise");
            b.0.arg(xs).arg(g).arg(be).arg(&mut y).arg(&r).arg(&c).arg(&eps).arg(&kind);
            // Safety: the arguments of `normalise`, sizes checked above.
            unsafe { launch(b, per_row(rows, 256)) }?;
        }
        Ok(self.array(x.shape().to_vec(), y))
    }
}
