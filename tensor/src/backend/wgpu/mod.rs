//! The wgpu backend: Vulkan, Metal or DX12 devices through wgpu, with WGSL
//! kernels (the `.wgsl` files beside this one): a tiled matrix product,
//! products with half-float and quantised weights decoded in the kernel,
//! layer and RMS normalisation, activations, softmax, attention over
//! packed sequences, rotary embeddings and embedding lookup.
//!
//! Every operation records one compute pass and submits it; results stay
//! on the device until downloaded. Weights stay in their file's format
//! (f16, bf16, GGUF blocks, K-quants included) and are decoded inside the
//! kernels (quant.wgsl), so a quantised model takes its file's size in
//! device memory. Sequences longer than 1024 run their attention on the
//! host.
//! Device memory the backend allocates is counted, and an allocation the
//! device refuses is a [`Error::TooLarge`] for that call, never a crash.

use super::{
    Activation, Array, AttentionSpec, Backend, DeviceInfo, DeviceKind, DeviceMemory, HostData, HostWeight, RopeSpec, Weight,
    WeightFormat, CachedAttention, KvCache, MatmulDims, check_attention, check_cached_attention, check_elementwise, check_linear, check_matmul,
    check_rope, check_rows, check_values, check_write_kv,
};
use crate::error::{Error, invalid_input};
use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Keys one sequence may have for the device's attention kernel.
const ATTENTION_KEYS: usize = 1024;

/// A buffer on the device, counted while it lives.
struct Memory {
    buffer: wgpu::Buffer,
    bytes: u64,
    allocated: Arc<AtomicU64>,
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

/// One kernel: its compute pipeline.
struct Kernels {
    matmul: wgpu::ComputePipeline,
    matmul_quant: wgpu::ComputePipeline,
    norm: wgpu::ComputePipeline,
    unary: wgpu::ComputePipeline,
    binary: wgpu::ComputePipeline,
    softmax: wgpu::ComputePipeline,
    gather: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    rope: wgpu::ComputePipeline,
    scatter: wgpu::ComputePipeline,
    cached_attention: wgpu::ComputePipeline,
}

/// A wgpu device and its kernels.
pub struct WgpuBackend {
    info: DeviceInfo,
    device: wgpu::Device,
    queue: wgpu::Queue,
    kernels: Kernels,
    allocated: Arc<AtomicU64>,
    /// The largest buffer a kernel may bind.
    max_buffer: u64,
    /// A buffer of zeros bound where a kernel's optional input is absent.
    zeros: wgpu::Buffer,
}

impl WgpuBackend {
    /// A backend on every adapter wgpu finds; software adapters (Mesa's
    /// lavapipe) only when `software`.
    pub fn all(software: bool) -> Result<Vec<WgpuBackend>, String> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor { backends: wgpu::Backends::PRIMARY, ..wgpu::InstanceDescriptor::new_without_display_handle() });
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        let mut found = Vec::new();
        let mut skipped = Vec::new();
        for adapter in adapters {
            let info = adapter.get_info();
            if info.device_type == wgpu::DeviceType::Cpu && !software {
                skipped.push(info.name.clone());
                continue;
            }
            match WgpuBackend::new(adapter) {
                Ok(backend) => found.push(backend),
                Err(why) => skipped.push(format!("{} ({why})", info.name)),
            }
        }
        match (found.is_empty(), skipped.is_empty()) {
            (false, _) => Ok(found),
            (true, true) => Err("no Vulkan, Metal or DX12 adapter".into()),
            (true, false) => Err(format!("only software adapters, not used as GPUs: {}", skipped.join(", "))),
        }
    }

    fn new(adapter: wgpu::Adapter) -> Result<WgpuBackend, String> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("gpuwasm"),
            required_limits: wgpu::Limits {
                max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
                max_buffer_size: limits.max_buffer_size,
                max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage.max(7),
                ..wgpu::Limits::default()
            },
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&descriptor)).map_err(|e| e.to_string())?;
        // Errors the kernels' error scopes do not catch are logged, never a panic.
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| eprintln!("gpuwasm: wgpu error: {e}")));
        let module = |name: &str, source: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(name), source: wgpu::ShaderSource::Wgsl(source.into()) })
        };
        let pipeline = |module: &wgpu::ShaderModule, entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let elementwise = module("elementwise", include_str!("elementwise.wgsl"));
        let kernels = Kernels {
            matmul: pipeline(&module("matmul", include_str!("matmul.wgsl")), "main"),
            matmul_quant: pipeline(&module("matmul_quant", concat!(include_str!("quant.wgsl"), include_str!("matmul_quant.wgsl"))), "main"),
            norm: pipeline(&module("norm", concat!(include_str!("reduce.wgsl"), include_str!("norm.wgsl"))), "main"),
            unary: pipeline(&elementwise, "unary"),
            binary: pipeline(&elementwise, "binary"),
            softmax: pipeline(&module("softmax", concat!(include_str!("reduce.wgsl"), include_str!("softmax.wgsl"))), "main"),
            gather: pipeline(&module("gather", concat!(include_str!("quant.wgsl"), include_str!("gather.wgsl"))), "main"),
            attention: pipeline(&module("attention", concat!(include_str!("reduce.wgsl"), include_str!("attention.wgsl"))), "main"),
            rope: pipeline(&module("rope", include_str!("rope.wgsl")), "main"),
            scatter: pipeline(&module("scatter", include_str!("scatter.wgsl")), "main"),
            cached_attention: pipeline(
                &module("cached_attention", concat!(include_str!("reduce.wgsl"), include_str!("cached_attention.wgsl"))),
                "main",
            ),
        };
        let zeros = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("zeros"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(WgpuBackend {
            info: DeviceInfo {
                kind: DeviceKind::Wgpu,
                name: info.name.clone(),
                driver: format!("{:?} {}", info.backend, info.driver_info).trim().to_string(),
                // wgpu does not say how much memory a device has (its
                // limits are per buffer): budgets come from the node.
                memory_bytes: None,
                f16,
            },
            device,
            queue,
            kernels,
            allocated: Arc::new(AtomicU64::new(0)),
            max_buffer: limits.max_buffer_size.min(limits.max_storage_buffer_binding_size),
            zeros,
        })
    }

    /// Bytes of device memory this backend holds now.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// A storage buffer of `bytes` (at least 16), filled from `data` when
    /// given; a device out of memory is [`Error::TooLarge`].
    fn buffer(&self, bytes: u64, data: Option<&[u8]>) -> Result<Memory, Error> {
        let size = bytes.max(16).div_ceil(4) * 4;
        if size > self.max_buffer {
            return Err(Error::TooLarge(format!("{bytes} bytes in one buffer; {} can bind {} at most", self.info.name, self.max_buffer)));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: data.is_some(),
        });
        if let Some(data) = data {
            let mut view = buffer.slice(..).get_mapped_range_mut().map_err(|e| Error::Unsupported(format!("writing to the device failed: {e}")))?;
            view.slice(..data.len()).copy_from_slice(data);
            drop(view);
            buffer.unmap();
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::TooLarge(format!("the device could not allocate {bytes} bytes: {e}")));
        }
        self.allocated.fetch_add(size, Ordering::Relaxed);
        Ok(Memory { buffer, bytes: size, allocated: self.allocated.clone() })
    }

    fn floats(&self, shape: Vec<usize>, values: &[f32]) -> Result<Array, Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let memory = self.buffer(bytes.len() as u64, Some(&bytes))?;
        Ok(Array::device(shape, Box::new(memory)))
    }

    fn output(&self, shape: Vec<usize>) -> Result<(Array, wgpu::Buffer), Error> {
        let n: usize = shape.iter().product();
        let memory = self.buffer(n as u64 * 4, None)?;
        let buffer = memory.buffer.clone();
        Ok((Array::device(shape, Box::new(memory)), buffer))
    }

    /// Runs `kernel` once over `groups` workgroups with `params` (a
    /// uniform struct as bytes) and `buffers` bound in order after it.
    fn run(&self, kernel: &wgpu::ComputePipeline, params: &[u32], buffers: &[&wgpu::Buffer], groups: [u32; 3]) -> Result<(), Error> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
        let uniform = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: bytes.len().max(16).div_ceil(16) as u64 * 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&uniform, 0, &bytes);
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
        entries.extend(buffers.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() }));
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &kernel.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_pipeline(kernel);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        self.queue.submit([encoder.finish()]);
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(Error::Unsupported(format!("the device refused a kernel: {e}"))),
            None => Ok(()),
        }
    }

    /// A buffer holding `values`.
    fn u32s(&self, values: &[u32]) -> Result<Memory, Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.buffer(bytes.len() as u64, Some(&bytes))
    }

    fn mem<'a>(&self, a: &'a Array) -> Result<&'a wgpu::Buffer, Error> {
        Ok(&a.device_memory::<Memory>()?.buffer)
    }

    fn weight_buffer<'a>(&self, w: &'a Weight) -> Result<&'a wgpu::Buffer, Error> {
        Ok(&w.device_memory::<Memory>()?.buffer)
    }

    fn unary(&self, x: &Array, op: u32) -> Result<Array, Error> {
        let n = x.len();
        let (out, buf) = self.output(x.shape().to_vec())?;
        if n > 0 {
            self.run(&self.kernels.unary, &[n as u32, op, 0, 0], &[self.mem(x)?, &self.zeros, &buf], spread(n, 256))?;
        }
        Ok(out)
    }

    fn binary(&self, a: &Array, b: &wgpu::Buffer, broadcast: bool, op: u32) -> Result<Array, Error> {
        let n = a.len();
        let (out, buf) = self.output(a.shape().to_vec())?;
        if n > 0 {
            let cols = a.matrix().1 as u32;
            self.run(&self.kernels.binary, &[n as u32, op, cols, broadcast as u32], &[self.mem(a)?, b, &buf], spread(n, 256))?;
        }
        Ok(out)
    }
}

/// Workgroups for `n` items, `per` per workgroup, as a 2-D grid when one
/// dimension would pass the 65535 limit.
fn spread(n: usize, per: usize) -> [u32; 3] {
    let groups = n.div_ceil(per).max(1);
    let x = groups.min(65535);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

impl Backend for WgpuBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn upload(&self, shape: Vec<usize>, values: Vec<f32>) -> Result<Array, Error> {
        check_values(&shape, values.len())?;
        self.floats(shape, &values)
    }

    fn download(&self, array: &Array) -> Result<Vec<f32>, Error> {
        let n = array.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = n as u64 * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("download"),
            size: bytes.div_ceil(4) * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        encoder.copy_buffer_to_buffer(self.mem(array)?, 0, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Unsupported(format!("waiting for the device failed: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Unsupported("the device dropped a download".into()))?
            .map_err(|e| Error::Unsupported(format!("reading from the device failed: {e}")))?;
        let view = staging.slice(..).get_mapped_range().map_err(|e| Error::Unsupported(format!("reading from the device failed: {e}")))?;
        let values = view[..bytes as usize].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        drop(view);
        staging.unmap();
        Ok(values)
    }

    fn weight(&self, weight: HostWeight) -> Result<Weight, Error> {
        let weight = weight.vectors_as_floats();
        let (rows, cols) = (weight.rows, weight.cols);
        let (format, bytes) = match weight.data {
            HostData::F32(values) => (WeightFormat::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
            HostData::Encoded(format, bytes) => (format, bytes),
        };
        let memory = self.buffer(bytes.len() as u64, Some(&bytes))?;
        Ok(Weight::device(rows, cols, format, Box::new(memory)))
    }

    fn embedding(&self, table: &Weight, ids: &[u32]) -> Result<Array, Error> {
        let cols = table.cols;
        let format = quant_code(table.format);
        let row_bytes = table.format.row_bytes(cols).ok_or_else(|| invalid_input(format!("{cols} columns of {:?}", table.format)))?;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(invalid_input(format!("token id {id} outside the vocabulary of {}", table.rows)));
        }
        let (out, buf) = self.output(vec![ids.len(), cols])?;
        let n = ids.len() * cols;
        if n > 0 {
            let ids = self.u32s(ids)?;
            let params = [n as u32, cols as u32, format, row_bytes as u32];
            self.run(&self.kernels.gather, &params, &[self.weight_buffer(table)?, &ids.buffer, &buf], spread(n, 256))?;
        }
        Ok(out)
    }

    fn linear(&self, x: &Array, w: &Weight, bias: Option<&Weight>) -> Result<Array, Error> {
        let (rows, cols, out_cols) = check_linear(x, w, bias)?;
        let (out, buf) = self.output(vec![rows, out_cols])?;
        if rows * out_cols == 0 {
            return Ok(out);
        }
        let bias_buf = match bias {
            Some(b) => self.weight_buffer(b)?,
            None => &self.zeros,
        };
        let has_bias = bias.is_some() as u32;
        match w.format {
            WeightFormat::F32 => {
                let params = [rows as u32, out_cols as u32, cols as u32, 0, 1, has_bias, 1f32.to_bits(), 0];
                let groups = [out_cols.div_ceil(16) as u32, rows.div_ceil(16) as u32, 1];
                self.run(&self.kernels.matmul, &params, &[self.mem(x)?, self.weight_buffer(w)?, bias_buf, &buf], groups)?;
            }
            format => {
                if rows > 65535 {
                    return Err(invalid_input(format!("{rows} rows at once by a quantised weight on wgpu (65535 at most)")));
                }
                let code = quant_code(format);
                let row_bytes = format.row_bytes(cols).ok_or_else(|| invalid_input(format!("{cols} columns of {format:?}")))?;
                let params = [rows as u32, cols as u32, out_cols as u32, code, row_bytes as u32, has_bias, 0, 0];
                let groups = [out_cols.div_ceil(64) as u32, rows as u32, 1];
                self.run(&self.kernels.matmul_quant, &params, &[self.mem(x)?, self.weight_buffer(w)?, bias_buf, &buf], groups)?;
            }
        }
        Ok(out)
    }

    fn matmul(&self, a: &Array, b: &Array, transpose_b: bool, alpha: f32) -> Result<Array, Error> {
        let MatmulDims { batch, b_batched, m, k, n, shape } = check_matmul(a, b, transpose_b)?;
        let (out, buf) = self.output(shape)?;
        if batch * m * n > 0 {
            let params = [m as u32, n as u32, k as u32, b_batched as u32, transpose_b as u32, 0, alpha.to_bits(), 0];
            let groups = [n.div_ceil(16) as u32, m.div_ceil(16) as u32, batch as u32];
            self.run(&self.kernels.matmul, &params, &[self.mem(a)?, self.mem(b)?, &self.zeros, &buf], groups)?;
        }
        Ok(out)
    }

    fn add(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        let broadcast = check_elementwise(a, b)?;
        self.binary(a, self.mem(b)?, broadcast, 0)
    }

    fn mul(&self, a: &Array, b: &Array) -> Result<Array, Error> {
        let broadcast = check_elementwise(a, b)?;
        self.binary(a, self.mem(b)?, broadcast, 1)
    }

    fn add_row(&self, x: &Array, row: &Weight) -> Result<Array, Error> {
        if row.rows * row.cols != x.matrix().1 || row.format != WeightFormat::F32 {
            return Err(invalid_input(format!("adding a row of {} to {:?}", row.cols, x.shape())));
        }
        self.binary(x, self.weight_buffer(row)?, true, 0)
    }

    fn layer_norm(&self, x: &Array, gamma: &Weight, beta: &Weight, eps: f32) -> Result<Array, Error> {
        self.norm(x, gamma, Some(beta), eps)
    }

    fn rms_norm(&self, x: &Array, gamma: &Weight, eps: f32) -> Result<Array, Error> {
        self.norm(x, gamma, None, eps)
    }

    fn activation(&self, x: &Array, f: Activation) -> Result<Array, Error> {
        let op = match f {
            Activation::Gelu => 0,
            Activation::GeluTanh => 1,
            Activation::Silu => 2,
            Activation::Relu => 3,
            Activation::Sigmoid => 4,
            Activation::Tanh => 5,
            Activation::Erf => 6,
        };
        self.unary(x, op)
    }

    fn softmax(&self, x: &Array) -> Result<Array, Error> {
        let (rows, cols) = x.matrix();
        let (out, buf) = self.output(x.shape().to_vec())?;
        if rows * cols > 0 {
            self.run(&self.kernels.softmax, &[rows as u32, cols as u32, 0, 0], &[self.mem(x)?, &buf], spread(rows, 1))?;
        }
        Ok(out)
    }

    fn attention(&self, q: &Array, k: &Array, v: &Array, spec: &AttentionSpec) -> Result<Array, Error> {
        let tokens = check_attention(q, k, v, spec)?;
        if spec.lens.iter().any(|&l| l > ATTENTION_KEYS) {
            // Longer sequences than the kernel's keys: on the host.
            let out = super::cpu::attention(&self.download(q)?, &self.download(k)?, &self.download(v)?, spec);
            return self.floats(vec![tokens, spec.heads * spec.dim], &out);
        }
        let (out, buf) = self.output(vec![tokens, spec.heads * spec.dim])?;
        if tokens == 0 {
            return Ok(out);
        }
        let (mut starts, mut lens) = (Vec::with_capacity(tokens), Vec::with_capacity(tokens));
        let mut at = 0u32;
        for &len in &spec.lens {
            starts.extend(std::iter::repeat_n(at, len));
            lens.extend(std::iter::repeat_n(len as u32, len));
            at += len as u32;
        }
        let (starts, lens) = (self.u32s(&starts)?, self.u32s(&lens)?);
        let params = [spec.heads as u32, spec.kv_heads as u32, spec.dim as u32, tokens as u32, spec.causal as u32, spec.scale.to_bits(), 0, 0];
        let [x, y, _] = spread(tokens, 1);
        self.run(
            &self.kernels.attention,
            &params,
            &[self.mem(q)?, self.mem(k)?, self.mem(v)?, &starts.buffer, &lens.buffer, &buf],
            [x, y, spec.heads as u32],
        )?;
        Ok(out)
    }

    fn rope(&self, x: &Array, positions: &[u32], spec: &RopeSpec) -> Result<Array, Error> {
        check_rope(x, positions, spec)?;
        let (out, buf) = self.output(x.shape().to_vec())?;
        let n = positions.len() * spec.heads * (spec.dim - spec.rotated / 2);
        if n > 0 {
            let positions_buf = self.u32s(positions)?;
            let params = [
                positions.len() as u32,
                spec.heads as u32,
                spec.dim as u32,
                spec.rotated as u32,
                spec.theta.to_bits(),
                spec.interleaved as u32,
                0,
                0,
            ];
            self.run(&self.kernels.rope, &params, &[self.mem(x)?, &positions_buf.buffer, &buf], spread(n, 256))?;
        }
        Ok(out)
    }

    fn select_rows(&self, x: &Array, rows: &[u32]) -> Result<Array, Error> {
        check_rows(x, rows)?;
        let cols = x.matrix().1;
        let (out, buf) = self.output(vec![rows.len(), cols])?;
        let n = rows.len() * cols;
        if n > 0 {
            let ids = self.u32s(rows)?;
            // The gather kernel reads the array as a table of f32 rows.
            let params = [n as u32, cols as u32, quant_code(WeightFormat::F32), (cols * 4) as u32];
            self.run(&self.kernels.gather, &params, &[self.mem(x)?, &ids.buffer, &buf], spread(n, 256))?;
        }
        Ok(out)
    }

    fn kv_cache(&self, slots: usize, width: usize) -> Result<KvCache, Error> {
        let bytes = (slots * width * 4) as u64;
        let (keys, values) = (self.buffer(bytes, None)?, self.buffer(bytes, None)?);
        Ok(KvCache::device(slots, width, Box::new(keys), Box::new(values)))
    }

    fn write_kv(&self, cache: &mut KvCache, k: &Array, v: &Array, slots: &[u32]) -> Result<(), Error> {
        check_write_kv(cache, k, v, slots)?;
        let n = slots.len() * cache.width;
        if n == 0 {
            return Ok(());
        }
        let slot_buf = self.u32s(slots)?;
        let (keys, values) = cache.device_memory::<Memory>()?;
        let params = [n as u32, cache.width as u32, 0, 0];
        self.run(&self.kernels.scatter, &params, &[self.mem(k)?, &slot_buf.buffer, &keys.buffer], spread(n, 256))?;
        self.run(&self.kernels.scatter, &params, &[self.mem(v)?, &slot_buf.buffer, &values.buffer], spread(n, 256))
    }

    fn cached_attention(&self, q: &Array, cache: &KvCache, spec: &CachedAttention) -> Result<Array, Error> {
        let rows = check_cached_attention(q, cache, spec)?;
        if spec.dim > 256 {
            return Err(Error::Unsupported(format!("attention heads of {} values on wgpu (256 at most)", spec.dim)));
        }
        let (out, buf) = self.output(vec![rows, spec.heads * spec.dim])?;
        if rows == 0 {
            return Ok(out);
        }
        let (offsets, keys, slots) = spec.rows();
        let (offsets, keys, slots) = (self.u32s(&offsets)?, self.u32s(&keys)?, self.u32s(&slots)?);
        let (k, v) = cache.device_memory::<Memory>()?;
        let params = [spec.heads as u32, spec.kv_heads as u32, spec.dim as u32, rows as u32, spec.scale.to_bits(), 0, 0, 0];
        let [x, y, _] = spread(rows, 1);
        self.run(
            &self.kernels.cached_attention,
            &params,
            &[self.mem(q)?, &k.buffer, &v.buffer, &offsets.buffer, &keys.buffer, &slots.buffer, &buf],
            [x, y, spec.heads as u32],
        )?;
        Ok(out)
    }
}

impl WgpuBackend {
    fn norm(&self, x: &Array, gamma: &Weight, beta: Option<&Weight>, eps: f32) -> Result<Array, Error> {
        let (rows, cols) = x.matrix();
        let fits = |w: &Weight| w.rows * w.cols == cols && w.format == WeightFormat::F32;
        if !fits(gamma) || beta.is_some_and(|b| !fits(b)) {
            return Err(invalid_input(format!("normalisation of {:?} with {} scales", x.shape(), gamma.cols)));
        }
        let (out, buf) = self.output(x.shape().to_vec())?;
        if rows * cols > 0 {
            let beta_buf = match beta {
                Some(b) => self.weight_buffer(b)?,
                None => &self.zeros,
            };
            let kind = beta.is_none() as u32;
            self.run(&self.kernels.norm, &[rows as u32, cols as u32, eps.to_bits(), kind], &[self.mem(x)?, self.weight_buffer(gamma)?, beta_buf, &buf], spread(rows, 1))?;
        }
        Ok(out)
    }
}

/// The code of quant.wgsl's `value_at` for `format`.
fn quant_code(format: WeightFormat) -> u32 {
    match format {
        WeightFormat::F32 => 0,
        WeightFormat::Q4_0 => 1,
        WeightFormat::Q4_1 => 2,
        WeightFormat::Q8_0 => 3,
        WeightFormat::F16 => 4,
        WeightFormat::BF16 => 5,
        WeightFormat::Q4K => 6,
        WeightFormat::Q5K => 7,
        WeightFormat::Q6K => 8,
    }
}
