//! The seam below the models: a [`Backend`] holds arrays and weights on one
//! device and runs the operations models are made of. Models (the BERT
//! encoder, the ONNX interpreter, the llama decoder) are written once over
//! it and never name a device; each backend brings its own kernels:
//!
//! - [`cpu`]: always present; the kernels of the host.
//! - [`wgpu`] (feature `wgpu`): Vulkan, Metal or DX12 through wgpu, with WGSL
//!   kernels; in CI on Mesa's lavapipe.
//! - [`cuda`] (feature `cuda`): NVIDIA GPUs through cudarc, loaded at run
//!   time (no toolkit needed to build), cuBLAS for products and NVRTC for
//!   the other kernels.
//!
//! Activations are `f32` [`Array`]s; [`Weight`]s keep the format the model
//! file gives them (f32, f16, or quantised blocks), prepared once at load in
//! the layout the backend's kernels read. A model runs a pass through a
//! [`Pass`], which reserves every array it makes from the call's memory
//! [`Budget`] first.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod devices;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use devices::{Devices, Target};

use crate::budget::{Budget, Reservation};
use crate::error::{Error, invalid_input};
use std::any::Any;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What kind of device a backend computes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The host's CPUs.
    Cpu,
    /// A GPU (or a software Vulkan device) through wgpu.
    Wgpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

impl DeviceKind {
    /// Its name, as `gpuwasm info` prints it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// A device a backend computes on.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// Its kind.
    pub kind: DeviceKind,
    /// The device's name (`llvmpipe (LLVM 15.0.6, 256 bits)`, `NVIDIA H200`, ...).
    pub name: String,
    /// What drives it (`Vulkan`, `CUDA 12.8`, `2 threads`, ...).
    pub driver: String,
    /// Its memory in bytes, when the device says.
    pub memory_bytes: Option<u64>,
    /// Whether it computes with half precision natively.
    pub f16: bool,
}

/// How a weight's elements are stored: plain floats, or GGUF's quantised
/// blocks (`elements` values in `bytes` bytes each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// `f32`.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 32 values: an f16 scale and 32 4-bit values (offset 8).
    Q4_0,
    /// 32 values: f16 scale and minimum, 32 4-bit values.
    Q4_1,
    /// 32 values: an f16 scale and 32 signed bytes.
    Q8_0,
    /// 256 values in 8 sub-blocks of 32 with 6-bit scales and minimums, 4-bit values.
    Q4K,
    /// 256 values in 8 sub-blocks with 6-bit scales and minimums, 5-bit values.
    Q5K,
    /// 256 values in 16 sub-blocks with 8-bit scales, 6-bit values.
    Q6K,
}

impl WeightFormat {
    /// Every format.
    pub const ALL: [WeightFormat; 9] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q8_0,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
    ];

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            WeightFormat::F32 => (1, 4),
            WeightFormat::F16 | WeightFormat::BF16 => (1, 2),
            WeightFormat::Q4_0 => (32, 18),
            WeightFormat::Q4_1 => (32, 20),
            WeightFormat::Q8_0 => (32, 34),
            WeightFormat::Q4K => (256, 144),
            WeightFormat::Q5K => (256, 176),
            WeightFormat::Q6K => (256, 210),
        }
    }

    /// Bytes a row of `cols` values takes, if `cols` is a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (values, bytes) = self.block();
        cols.is_multiple_of(values).then(|| cols / values * bytes)
    }
}

/// A weight matrix (`rows` x `cols`, row-major) on the host, as the model
/// file holds it. Vectors (biases, norm scales) are one row.
#[derive(Clone, Debug)]
pub struct HostWeight {
    /// Rows (output features of a linear layer).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// The elements.
    pub data: HostData,
}

/// The elements of a [`HostWeight`].
#[derive(Clone, Debug)]
pub enum HostData {
    /// Plain floats.
    F32(Vec<f32>),
    /// Encoded rows in `format`, each [`WeightFormat::row_bytes`] long.
    Encoded(WeightFormat, Vec<u8>),
}

impl HostWeight {
    /// A float matrix; `values` holds `rows * cols` elements.
    pub fn f32(rows: usize, cols: usize, values: Vec<f32>) -> HostWeight {
        debug_assert_eq!(values.len(), rows * cols);
        HostWeight { rows, cols, data: HostData::F32(values) }
    }

    /// A vector as one row.
    pub fn vector(values: Vec<f32>) -> HostWeight {
        HostWeight::f32(1, values.len(), values)
    }

    /// Its format.
    pub fn format(&self) -> WeightFormat {
        match &self.data {
            HostData::F32(_) => WeightFormat::F32,
            HostData::Encoded(format, _) => *format,
        }
    }

    /// Vectors (biases, norm scales: one row) as floats, whatever their
    /// format: GPU kernels add and scale by float rows, and vectors are
    /// small. Matrices are returned as they are.
    pub fn vectors_as_floats(self) -> HostWeight {
        match self.data {
            HostData::Encoded(format, bytes) if self.rows == 1 => HostWeight::f32(1, self.cols, crate::quant::decode(format, &bytes)),
            _ => self,
        }
    }

    /// Bytes its elements take.
    pub fn bytes(&self) -> u64 {
        match &self.data {
            HostData::F32(v) => v.len() as u64 * 4,
            HostData::Encoded(_, b) => b.len() as u64,
        }
    }
}

/// Memory a backend allocated on its device, owned by an [`Array`] or a
/// [`Weight`]; the backend downcasts it to its own type.
pub trait DeviceMemory: Any + Send + Sync {
    /// As `Any`, to downcast.
    fn as_any(&self) -> &dyn Any;
}

/// Where an array's or weight's elements are.
pub enum Data<T> {
    /// In host memory.
    Host(T),
    /// On a device.
    Device(Box<dyn DeviceMemory>),
}

/// An `f32` array on a backend's device (activations).
pub struct Array {
    shape: Vec<usize>,
    data: Data<Vec<f32>>,
    /// The pass memory it holds, given back when it is dropped.
    _held: Option<Reservation>,
}

impl Array {
    /// An array of host memory.
    pub fn host(shape: Vec<usize>, values: Vec<f32>) -> Array {
        debug_assert_eq!(values.len(), shape.iter().product::<usize>());
        Array { shape, data: Data::Host(values), _held: None }
    }

    /// An array of device memory.
    pub fn device(shape: Vec<usize>, memory: Box<dyn DeviceMemory>) -> Array {
        Array { shape, data: Data::Device(memory), _held: None }
    }

    /// Its dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Its elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows and columns of it seen as a matrix (its last dimension the columns).
    pub fn matrix(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.len().checked_div(cols).unwrap_or(0), cols)
    }

    /// Its host elements, when it lives in host memory.
    pub fn host_values(&self) -> Option<&[f32]> {
        match &self.data {
            Data::Host(v) => Some(v),
            Data::Device(_) => None,
        }
    }

    /// Its device memory as the backend's type `M`.
    pub fn device_memory<M: 'static>(&self) -> Result<&M, Error> {
        match &self.data {
            Data::Device(m) => m.as_any().downcast_ref::<M>().ok_or_else(|| wrong_device("an array")),
            Data::Host(_) => Err(wrong_device("an array")),
        }
    }

    /// The same elements seen with another shape of as many elements.
    pub fn reshape(mut self, shape: Vec<usize>) -> Result<Array, Error> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(invalid_input(format!("cannot see {:?} as {shape:?}", self.shape)));
        }
        self.shape = shape;
        Ok(self)
    }
}

/// A weight prepared for one backend (see [`Backend::weight`]).
pub struct Weight {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// How the backend stores it.
    pub format: WeightFormat,
    data: Data<HostData>,
}

impl Weight {
    /// A weight kept in host memory.
    pub fn host(weight: HostWeight) -> Weight {
        Weight { rows: weight.rows, cols: weight.cols, format: weight.format(), data: Data::Host(weight.data) }
    }

    /// A weight on a device.
    pub fn device(rows: usize, cols: usize, format: WeightFormat, memory: Box<dyn DeviceMemory>) -> Weight {
        Weight { rows, cols, format, data: Data::Device(memory) }
    }

    /// Bytes its elements take in the backend's format.
    pub fn bytes(&self) -> u64 {
        let row = self.format.row_bytes(self.cols).unwrap_or(self.cols * self.format.block().1);
        (self.rows * row) as u64
    }

    /// Its host elements, when it lives in host memory.
    pub fn host_data(&self) -> Option<&HostData> {
        match &self.data {
            Data::Host(d) => Some(d),
            Data::Device(_) => None,
        }
    }

    /// Its device memory as the backend's type `M`.
    pub fn device_memory<M: 'static>(&self) -> Result<&M, Error> {
        match &self.data {
            Data::Device(m) => m.as_any().downcast_ref::<M>().ok_or_else(|| wrong_device("a weight")),
            Data::Host(_) => Err(wrong_device("a weight")),
        }
    }
}

fn wrong_device(what: &str) -> Error {
    Error::Unsupported(format!("{what} of another device was given to this backend"))
}

/// An elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x/2 (1 + erf(x/√2))`.
    Gelu,
    /// The tanh approximation of GELU.
    GeluTanh,
    /// `x σ(x)`.
    Silu,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh x`.
    Tanh,
    /// The error function.
    Erf,
}

/// What a linear layer does to its outputs before storing them (see
/// [`Backend::linear_then`]): `R` is the residual's type (an [`Array`]
/// here, its values inside a backend).
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<R> {
    /// Nothing: `y`.
    None,
    /// `f(y)`.
    Activation(Activation),
    /// `y + residual`, a residual of the output's shape.
    Residual(R),
}

impl<R> Epilogue<R> {
    /// The same epilogue with its residual mapped by `f`.
    pub fn try_map<S, E>(self, f: impl FnOnce(R) -> Result<S, E>) -> Result<Epilogue<S>, E> {
        Ok(match self {
            Epilogue::None => Epilogue::None,
            Epilogue::Activation(a) => Epilogue::Activation(a),
            Epilogue::Residual(r) => Epilogue::Residual(f(r)?),
        })
    }
}

/// Attention over packed sequences: `q` is `[tokens, heads * dim]`, `k`
/// and `v` are `[tokens, kv_heads * dim]` (grouped-query attention when
/// `kv_heads < heads`); sequence `i` is the next `lens[i]` rows. Each
/// sequence attends only to itself; `causal` masks later positions.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    /// Rows of each sequence, in order.
    pub lens: Vec<usize>,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Values per head.
    pub dim: usize,
    /// Whether a position sees only itself and earlier ones.
    pub causal: bool,
    /// The factor on `q·k` (usually `1/√dim`).
    pub scale: f32,
}

/// Rotary position embedding of `[tokens, heads * dim]` rows: each
/// head's first `rotated` values turn by position-dependent angles.
#[derive(Clone, Debug)]
pub struct RopeSpec {
    /// Heads per row.
    pub heads: usize,
    /// Values per head.
    pub dim: usize,
    /// How many of them rotate (the rest pass through).
    pub rotated: usize,
    /// The base of the frequencies (`rope.freq_base`, 10000 by default).
    pub theta: f32,
    /// Whether pairs are adjacent (`x[2i], x[2i+1]`, GGUF's llama layout)
    /// rather than split halves (`x[i], x[i + rotated/2]`, NeoX).
    pub interleaved: bool,
}

/// One layer's keys and values for the sequences a generation engine
/// runs: `slots` rows of `width` values (`kv_heads * dim`) each, addressed
/// by slot; an engine hands each sequence slots from fixed-size blocks
/// (a paged cache), so sequences of any length share one allocation.
pub struct KvCache {
    /// Rows.
    pub slots: usize,
    /// Values per row.
    pub width: usize,
    keys: Data<Vec<f32>>,
    values: Data<Vec<f32>>,
}

impl KvCache {
    /// A cache in host memory, zeroed.
    pub fn host(slots: usize, width: usize) -> KvCache {
        KvCache { slots, width, keys: Data::Host(vec![0.0; slots * width]), values: Data::Host(vec![0.0; slots * width]) }
    }

    /// A cache in device memory.
    pub fn device(slots: usize, width: usize, keys: Box<dyn DeviceMemory>, values: Box<dyn DeviceMemory>) -> KvCache {
        KvCache { slots, width, keys: Data::Device(keys), values: Data::Device(values) }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> u64 {
        (2 * self.slots * self.width * 4) as u64
    }

    /// Keys and values, when in host memory.
    pub fn host_values(&self) -> Option<(&[f32], &[f32])> {
        match (&self.keys, &self.values) {
            (Data::Host(k), Data::Host(v)) => Some((k, v)),
            _ => None,
        }
    }

    /// Keys and values to write, when in host memory.
    pub fn host_values_mut(&mut self) -> Option<(&mut [f32], &mut [f32])> {
        match (&mut self.keys, &mut self.values) {
            (Data::Host(k), Data::Host(v)) => Some((k, v)),
            _ => None,
        }
    }

    /// Keys and values as the backend's device memory type `M`.
    pub fn device_memory<M: 'static>(&self) -> Result<(&M, &M), Error> {
        match (&self.keys, &self.values) {
            (Data::Device(k), Data::Device(v)) => Ok((
                k.as_any().downcast_ref::<M>().ok_or_else(|| wrong_device("a cache"))?,
                v.as_any().downcast_ref::<M>().ok_or_else(|| wrong_device("a cache"))?,
            )),
            _ => Err(wrong_device("a cache")),
        }
    }
}

/// Attention of new query rows over their sequences' keys and values in a
/// [`KvCache`]: `q` is `[rows, heads * dim]`, the rows of each sequence in
/// turn.
#[derive(Clone, Debug)]
pub struct CachedAttention {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Values per head.
    pub dim: usize,
    /// The factor on `q·k`.
    pub scale: f32,
    /// The sequences, in the order of their rows.
    pub seqs: Vec<CachedSeq>,
}

/// One sequence of a [`CachedAttention`].
#[derive(Clone, Debug)]
pub struct CachedSeq {
    /// Its query rows (its newest positions).
    pub queries: usize,
    /// The cache slot of each of its positions, in order, the queries'
    /// own included (written before the attention): query `i` sits at
    /// position `slots.len() - queries + i` and sees positions up to it.
    pub slots: Vec<u32>,
}

impl CachedAttention {
    /// Per query row: where its sequence's slots start in the
    /// concatenation of all sequences' slots, and how many keys it sees.
    pub(crate) fn rows(&self) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let (mut offsets, mut keys, mut all) = (Vec::new(), Vec::new(), Vec::new());
        for seq in &self.seqs {
            let first = seq.slots.len() - seq.queries;
            for i in 0..seq.queries {
                offsets.push(all.len() as u32);
                keys.push((first + i + 1) as u32);
            }
            all.extend_from_slice(&seq.slots);
        }
        (offsets, keys, all)
    }
}

/// A device and its kernels. Every method checks its inputs' shapes and
/// fails with [`Error::InvalidInput`] when they disagree; arrays and
/// weights of another backend are refused.
pub trait Backend: Send + Sync {
    /// The device.
    fn info(&self) -> &DeviceInfo;
    /// An array of `values` with `shape` on the device.
    fn upload(&self, shape: Vec<usize>, values: Vec<f32>) -> Result<Array, Error>;
    /// The elements of `array`, in host memory.
    fn download(&self, array: &Array) -> Result<Vec<f32>, Error>;
    /// Prepares a weight once, in the layout this backend's kernels read.
    fn weight(&self, weight: HostWeight) -> Result<Weight, Error>;
    /// Rows `ids` of `table`, as `[ids.len(), table.cols]`.
    fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Array, Error>;
    /// `x [rows, w.cols] · wᵀ (+ bias)`: `[rows, w.rows]`.
    fn linear(&self, x: &Array, w: &Weight, bias: Option<&Weight>) -> Result<Array, Error>;
    /// [`Backend::linear`] followed by `then`. A backend that fuses the
    /// epilogue into the product's stores (the CPU's) saves a pass over the
    /// output and its copy; this default runs them one after the other, and
    /// holds the unfused output for as long as the second step takes.
    fn linear_then(&self, x: &Array, w: &Weight, bias: Option<&Weight>, then: Epilogue<&Array>) -> Result<Array, Error> {
        check_epilogue(then, x.matrix().0, w.rows)?;
        let y = self.linear(x, w, bias)?;
        match then {
            Epilogue::None => Ok(y),
            Epilogue::Activation(f) => self.activation(&y, f),
            Epilogue::Residual(r) => self.add(&y, r),
        }
    }
    /// `alpha · a · b` for `a [batch, m, k]` and `b [batch or 1, k, n]`
    /// (`[batch or 1, n, k]` when `transpose_b`): `[batch, m, n]`.
    fn matmul(&self, a: &Array, b: &Array, transpose_b: bool, alpha: f32) -> Result<Array, Error>;
    /// `a + b`, `b` of `a`'s shape or one row broadcast over `a`'s rows.
    fn add(&self, a: &Array, b: &Array) -> Result<Array, Error>;
    /// `a * b`, elementwise, `b` of `a`'s shape or one row.
    fn mul(&self, a: &Array, b: &Array) -> Result<Array, Error>;
    /// `x + row` for a weight of one row.
    fn add_row(&self, x: &Array, row: &Weight) -> Result<Array, Error>;
    /// Layer normalisation of each row.
    fn layer_norm(&self, x: &Array, gamma: &Weight, beta: &Weight, eps: f32) -> Result<Array, Error>;
    /// RMS normalisation of each row.
    fn rms_norm(&self, x: &Array, gamma: &Weight, eps: f32) -> Result<Array, Error>;
    /// `f` on every element.
    fn activation(&self, x: &Array, f: Activation) -> Result<Array, Error>;
    /// Softmax of each row.
    fn softmax(&self, x: &Array) -> Result<Array, Error>;
    /// Attention (see [`AttentionSpec`]): `[tokens, heads * dim]`.
    fn attention(&self, q: &Array, k: &Array, v: &Array, spec: &AttentionSpec) -> Result<Array, Error>;
    /// Rotary position embedding of each row at `positions[row]`.
    fn rope(&self, x: &Array, positions: &[u32], spec: &RopeSpec) -> Result<Array, Error>;
    /// Rows `rows` of `x` (`[rows.len(), cols]`).
    fn select_rows(&self, x: &Array, rows: &[u32]) -> Result<Array, Error>;
    /// A zeroed key/value cache of `slots` rows of `width` on the device.
    fn kv_cache(&self, slots: usize, width: usize) -> Result<KvCache, Error>;
    /// Writes row `i` of `k` and `v` to slot `slots[i]` of `cache`.
    fn write_kv(&self, cache: &mut KvCache, k: &Array, v: &Array, slots: &[u32]) -> Result<(), Error>;
    /// Attention over cached keys and values (see [`CachedAttention`]):
    /// `[rows, heads * dim]`.
    fn cached_attention(&self, q: &Array, cache: &KvCache, spec: &CachedAttention) -> Result<Array, Error>;
}

thread_local! {
    /// How many CPU passes and spinners this thread is inside.
    static BUSY: Cell<u32> = const { Cell::new(0) };
}

/// This thread inside a CPU pass or a spinner, until dropped.
struct Busy;

impl Busy {
    fn enter() -> Busy {
        BUSY.set(BUSY.get() + 1);
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.set(BUSY.get() - 1);
    }
}

/// Sets its flag when dropped.
struct Ends<'f>(&'f AtomicBool);

impl Drop for Ends<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One pass of a model on a backend, within a memory [`Budget`]: every
/// array it makes is reserved first (its shape known before the kernel
/// runs) and given back when the array is dropped, so the budget tracks
/// what the pass holds at each moment.
pub struct Pass<'a> {
    /// The backend.
    pub backend: &'a dyn Backend,
    budget: &'a Budget,
}

impl<'a> Pass<'a> {
    /// A pass on `backend` within `budget`.
    pub fn new(backend: &'a dyn Backend, budget: &'a Budget) -> Pass<'a> {
        Pass { backend, budget }
    }

    /// Runs `f`, the body of a pass, where the backend computes best: for
    /// the CPU on a worker of rayon's pool, so the pass's parallel kernels
    /// split there instead of the calling thread handing each one over and
    /// sleeping until it is done (two context switches a kernel); for
    /// other backends on the calling thread.
    ///
    /// While a CPU pass runs, the pool's other workers spin, running any
    /// job they find, instead of sleeping between its products: the half
    /// of a product a worker takes is then taken at once, not after a
    /// wake-up (15-45% more MiniLM embeddings/s at batch 1 on 2 cores, in
    /// three alternating rounds of `gpuwasm bench nn`). The cost: the
    /// spinning burns the idle cores for the pass's length, and a spinner
    /// that picks up another model's pass finishes it before it stops, so
    /// with several CPU models busy at once a pass can end later than its
    /// own work.
    pub fn run<T: Send>(&self, f: impl FnOnce(&Pass<'a>) -> T + Send) -> T {
        match self.backend.info().kind {
            DeviceKind::Cpu => {
                let done = AtomicBool::new(false);
                let done = &done;
                rayon::scope(|scope| {
                    for _ in 1..rayon::current_num_threads() {
                        scope.spawn(move |_| {
                            // Only on a thread that is in no pass and no
                            // spinner: one taken by a thread that waits
                            // below it (for half of a product) could
                            // otherwise wait for the pass it stalls.
                            if BUSY.get() > 0 {
                                return;
                            }
                            let _busy = Busy::enter();
                            while !done.load(Ordering::Acquire) {
                                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                                    std::hint::spin_loop();
                                }
                            }
                        });
                    }
                    // Set when the pass ends, even by a panic, so the spinners stop.
                    let _ends = Ends(done);
                    let _busy = Busy::enter();
                    f(self)
                })
            }
            _ => f(self),
        }
    }

    /// Runs `op`, whose result has `shape`, with its memory reserved first.
    fn make(&self, what: &str, shape: Vec<usize>, op: impl FnOnce() -> Result<Array, Error>) -> Result<Array, Error> {
        let held = self.budget.reserve_tensor(&shape, 4, || format!("the {what}"))?;
        let mut array = op()?;
        array._held = Some(held);
        Ok(array)
    }

    /// [`Backend::upload`].
    pub fn upload(&self, shape: Vec<usize>, values: Vec<f32>) -> Result<Array, Error> {
        self.make("input", shape.clone(), || self.backend.upload(shape, values))
    }

    /// [`Backend::download`].
    pub fn download(&self, array: &Array) -> Result<Vec<f32>, Error> {
        self.backend.download(array)
    }

    /// [`Backend::embedding`].
    pub fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Array, Error> {
        self.make("embedding", vec![ids.len(), table.cols], || self.backend.embedding(table, ids))
    }

    /// [`Backend::linear`].
    pub fn linear(&self, x: &Array, w: &Weight, bias: Option<&Weight>) -> Result<Array, Error> {
        self.make("linear layer's output", vec![x.matrix().0, w.rows], || self.backend.linear(x, w, bias))
    }

    /// [`Backend::linear_then`].
    pub fn linear_then(&self, x: &Array, w: &Weight, bias: Option<&Weight>, then: Epilogue<&Array>) -> Result<Array, Error> {
        self.make("linear layer's output", vec![x.matrix().0, w.rows], || self.backend.linear_then(x, w, bias, then))
    }

    /// [`Backend::matmul`].
    pub fn matmul(&self, a: &Array, b: &Array, transpose_b: bool, alpha: f32) -> Result<Array, Error> {
        let n = match (b.shape(), transpose_b) {
            ([.., n, _], true) | ([.., _, n], false) => *n,
            _ => return Err(invalid_input(format!("matmul of {:?} and {:?}", a.shape(), b.shape()))),
        };
        let (rows, _) = a.matrix();
        let mut shape = a.shape().to_vec();
        match shape.last_mut() {
            Some(last) => *last = n,
            None => return Err(invalid_input("matmul of a scalar")),
        }
        debug_assert_eq!(shape.iter().product::<usize>(), rows * n);
        self.make("product", shape, || self.backend.matmul(a, b, transpose_b, alpha))
    }

    /// [`Backend::add`].
    pub fn add(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        self.make("sum", a.shape().to_vec(), || self.backend.add(a, b))
    }

    /// [`Backend::mul`].
    pub fn mul(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        self.make("product", a.shape().to_vec(), || self.backend.mul(a, b))
    }

    /// [`Backend::add_row`].
    pub fn add_row(&self, x: &Array, row: &Weight) -> Result<Array, Error> {
        self.make("sum", x.shape().to_vec(), || self.backend.add_row(x, row))
    }

    /// [`Backend::layer_norm`].
    pub fn layer_norm(&self, x: &Array, gamma: &Weight, beta: &Weight, eps: f32) -> Result<Array, Error> {
        self.make("normalised rows", x.shape().to_vec(), || self.backend.layer_norm(x, gamma, beta, eps))
    }

    /// [`Backend::rms_norm`].
    pub fn rms_norm(&self, x: &Array, gamma: &Weight, eps: f32) -> Result<Array, Error> {
        self.make("normalised rows", x.shape().to_vec(), || self.backend.rms_norm(x, gamma, eps))
    }

    /// [`Backend::activation`].
    pub fn activation(&self, x: &Array, f: Activation) -> Result<Array, Error> {
        self.make("activations", x.shape().to_vec(), || self.backend.activation(x, f))
    }

    /// [`Backend::softmax`].
    pub fn softmax(&self, x: &Array) -> Result<Array, Error> {
        self.make("softmax", x.shape().to_vec(), || self.backend.softmax(x))
    }

    /// [`Backend::attention`].
    pub fn attention(&self, q: &Array, k: &Array, v: &Array, spec: &AttentionSpec) -> Result<Array, Error> {
        // Scores of the longest sequence, per head, on top of the output.
        let longest = spec.lens.iter().copied().max().unwrap_or(0);
        let _scores = self.budget.reserve_tensor(&[spec.heads, longest, longest], 4, || "the attention scores".into())?;
        self.make("attention output", q.shape().to_vec(), || self.backend.attention(q, k, v, spec))
    }

    /// [`Backend::rope`].
    pub fn rope(&self, x: &Array, positions: &[u32], spec: &RopeSpec) -> Result<Array, Error> {
        self.make("rotated rows", x.shape().to_vec(), || self.backend.rope(x, positions, spec))
    }

    /// [`Backend::select_rows`].
    pub fn select_rows(&self, x: &Array, rows: &[u32]) -> Result<Array, Error> {
        self.make("rows", vec![rows.len(), x.matrix().1], || self.backend.select_rows(x, rows))
    }

    /// [`Backend::write_kv`].
    pub fn write_kv(&self, cache: &mut KvCache, k: &Array, v: &Array, slots: &[u32]) -> Result<(), Error> {
        self.backend.write_kv(cache, k, v, slots)
    }

    /// [`Backend::cached_attention`].
    pub fn cached_attention(&self, q: &Array, cache: &KvCache, spec: &CachedAttention) -> Result<Array, Error> {
        self.make("attention output", q.shape().to_vec(), || self.backend.cached_attention(q, cache, spec))
    }
}

/// Checks an upload's values fill its shape.
pub(crate) fn check_values(shape: &[usize], values: usize) -> Result<(), Error> {
    if shape.iter().product::<usize>() != values {
        return Err(invalid_input(format!("dimensions {shape:?} for {values} values")));
    }
    Ok(())
}

/// Checks what every backend's `linear` needs.
pub(crate) fn check_linear(x: &Array, w: &Weight, bias: Option<&Weight>) -> Result<(usize, usize, usize), Error> {
    let (rows, cols) = x.matrix();
    if cols != w.cols || bias.is_some_and(|b| b.cols != w.rows || b.rows != 1) {
        return Err(invalid_input(format!(
            "linear of {:?} by a {}x{} weight{}",
            x.shape(),
            w.rows,
            w.cols,
            bias.map_or(String::new(), |b| format!(" and a bias of {}", b.cols))
        )));
    }
    Ok((rows, cols, w.rows))
}

/// Checks an epilogue fits a linear layer's `[rows, out]` output: a
/// residual of exactly that shape.
pub(crate) fn check_epilogue(then: Epilogue<&Array>, rows: usize, out: usize) -> Result<(), Error> {
    match then {
        Epilogue::Residual(r) if r.shape() != [rows, out] => {
            Err(invalid_input(format!("adding a residual of {:?} to a linear layer's [{rows}, {out}]", r.shape())))
        }
        _ => Ok(()),
    }
}

/// A matrix product's dimensions (see [`Backend::matmul`]).
pub(crate) struct MatmulDims {
    /// Batches of `a`.
    pub batch: usize,
    /// Whether `b` has one matrix per batch (else one for all).
    pub b_batched: bool,
    /// `a`'s rows.
    pub m: usize,
    /// The inner dimension.
    pub k: usize,
    /// The output's columns.
    pub n: usize,
    /// The output's shape: `a`'s with `n` columns.
    pub shape: Vec<usize>,
}

/// Checks what every backend's `matmul` needs: `a` of rank 2 or 3 (rank 2
/// a batch of one), `b` likewise, agreeing in the inner dimension.
pub(crate) fn check_matmul(a: &Array, b: &Array, transpose_b: bool) -> Result<MatmulDims, Error> {
    let (sa, sb) = (a.shape(), b.shape());
    let rank3 = |s: &[usize]| match *s {
        [m, n] => Some([1, m, n]),
        [b, m, n] => Some([b, m, n]),
        _ => None,
    };
    let bad = || invalid_input(format!("matmul of {sa:?} and {sb:?}"));
    let [batch, m, k] = rank3(sa).ok_or_else(bad)?;
    let [bb, b0, b1] = rank3(sb).ok_or_else(bad)?;
    let (bk, n) = if transpose_b { (b1, b0) } else { (b0, b1) };
    if bk != k || (bb != batch && bb != 1) {
        return Err(bad());
    }
    let mut shape = sa.to_vec();
    *shape.last_mut().expect("rank 2 or 3") = n;
    Ok(MatmulDims { batch, b_batched: bb != 1, m, k, n, shape })
}

/// Checks `b` fits elementwise on `a`: the same shape, or one row of `a`'s width.
pub(crate) fn check_elementwise(a: &Array, b: &Array) -> Result<bool, Error> {
    if a.shape() == b.shape() {
        return Ok(false);
    }
    if b.len() == a.matrix().1 {
        return Ok(true);
    }
    Err(invalid_input(format!("elementwise of {:?} and {:?}", a.shape(), b.shape())))
}

/// Checks an attention's inputs; the total of `lens`.
pub(crate) fn check_attention(q: &Array, k: &Array, v: &Array, spec: &AttentionSpec) -> Result<usize, Error> {
    let tokens: usize = spec.lens.iter().sum();
    let ok = spec.kv_heads > 0
        && spec.heads.is_multiple_of(spec.kv_heads)
        && q.shape() == [tokens, spec.heads * spec.dim]
        && k.shape() == [tokens, spec.kv_heads * spec.dim]
        && v.shape() == k.shape();
    if !ok {
        return Err(invalid_input(format!(
            "attention of q {:?}, k {:?}, v {:?} for sequences of {:?} rows, {} heads ({} for keys) of {}",
            q.shape(),
            k.shape(),
            v.shape(),
            spec.lens,
            spec.heads,
            spec.kv_heads,
            spec.dim
        )));
    }
    Ok(tokens)
}

/// Checks a row selection: every row inside `x`.
pub(crate) fn check_rows(x: &Array, rows: &[u32]) -> Result<(), Error> {
    let (n, _) = x.matrix();
    match rows.iter().find(|&&r| r as usize >= n) {
        Some(r) => Err(invalid_input(format!("row {r} of {:?}", x.shape()))),
        None => Ok(()),
    }
}

/// Checks a cache write: `k` and `v` of the cache's width, a slot inside
/// it for each of their rows.
pub(crate) fn check_write_kv(cache: &KvCache, k: &Array, v: &Array, slots: &[u32]) -> Result<(), Error> {
    let ok = k.shape() == v.shape()
        && k.matrix() == (slots.len(), cache.width)
        && slots.iter().all(|&s| (s as usize) < cache.slots);
    if !ok {
        return Err(invalid_input(format!(
            "writing k {:?} and v {:?} to {} slots of a cache of {} rows of {}",
            k.shape(),
            v.shape(),
            slots.len(),
            cache.slots,
            cache.width
        )));
    }
    Ok(())
}

/// Checks a cached attention's inputs; the query rows.
pub(crate) fn check_cached_attention(q: &Array, cache: &KvCache, spec: &CachedAttention) -> Result<usize, Error> {
    let rows: usize = spec.seqs.iter().map(|s| s.queries).sum();
    let ok = spec.kv_heads > 0
        && spec.heads.is_multiple_of(spec.kv_heads)
        && q.shape() == [rows, spec.heads * spec.dim]
        && cache.width == spec.kv_heads * spec.dim
        && spec.seqs.iter().all(|s| s.queries <= s.slots.len() && s.slots.iter().all(|&x| (x as usize) < cache.slots));
    if !ok {
        return Err(invalid_input(format!(
            "cached attention of q {:?} with {} heads ({} for keys) of {} over a cache of {} rows of {}",
            q.shape(),
            spec.heads,
            spec.kv_heads,
            spec.dim,
            cache.slots,
            cache.width
        )));
    }
    Ok(rows)
}

/// Checks a rotary embedding's input: a row per position, `spec.heads`
/// heads of `spec.dim`, an even number of them rotated.
pub(crate) fn check_rope(x: &Array, positions: &[u32], spec: &RopeSpec) -> Result<(), Error> {
    if x.matrix() != (positions.len(), spec.heads * spec.dim) || spec.rotated > spec.dim || !spec.rotated.is_multiple_of(2) {
        return Err(invalid_input(format!("rotary embedding of {:?} at {} positions", x.shape(), positions.len())));
    }
    Ok(())
}

/// Shared handle to a backend.
pub type SharedBackend = Arc<dyn Backend>;
