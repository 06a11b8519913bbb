//! ipcompose's CUDA kernels (kernels/ipcompose.cu) as candle custom ops, and the switch that
//! keeps candle's kernel parameters on the device. Used only on CUDA tensors; the CPU and
//! every other case keep their own paths.
//!
//! `IPCOMPOSE_CUDA_KERNELS=0` turns the fused kernels off (candle's ops instead), for
//! comparisons such as `tools/gpu/device-check.sh`'s.

use candle_core::{Device, Result, Tensor};

/// While alive, candle's CUDA backend keeps the small parameter vectors its strided kernels
/// need (dims and strides) in a device-side cache keyed by content, instead of copying them
/// from the host at every launch: after the first UNet forward a step copies nothing to the
/// GPU (`ipcompose run --verbose` counts it). A no-op off CUDA.
pub struct DeviceParamCache(#[allow(dead_code)] Option<Box<dyn std::any::Any>>);

impl DeviceParamCache {
    pub fn enable(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            return Self(Some(Box::new(cuda.enable_cuda_graph_htod_cache())));
        }
        let _ = device;
        Self(None)
    }
}

/// Whether the fused kernels serve this tensor: a contiguous CUDA tensor, kernels not
/// switched off.
pub(crate) fn fused_kernels_for(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED
            .get_or_init(|| std::env::var("IPCOMPOSE_CUDA_KERNELS").map_or(true, |v| v != "0"));
        enabled && t.device().is_cuda() && t.is_contiguous()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        false
    }
}

/// GroupNorm of a contiguous CUDA `[B, C, …]` tensor with per-channel `weight` and `bias`,
/// followed by SiLU when `silu`: one kernel, statistics and affine map in f32.
pub(crate) fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    xs.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

/// `value · gelu_erf(gate)` of a contiguous CUDA `[.., 2·inner]` projection: one kernel.
pub(crate) fn geglu(projected: &Tensor) -> Result<Tensor> {
    projected.apply_op1_no_bwd(&GegluOp)
}

// Read only by the CUDA launch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

struct GegluOp;

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ipcompose-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("ipcompose's group-norm kernel runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
        };
        use candle_core::cuda_backend::{kernel_name, Map3, WrapErr};
        use candle_core::{CudaDevice, WithDType};

        struct Launch<'a>(&'a GroupNormOp);
        impl Map3 for Launch<'_> {
            fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
                &self,
                src: &CudaSlice<T>,
                layout: &candle_core::Layout,
                weight: &CudaSlice<T>,
                weight_layout: &candle_core::Layout,
                bias: &CudaSlice<T>,
                bias_layout: &candle_core::Layout,
                dev: &CudaDevice,
            ) -> Result<CudaSlice<T>> {
                let op = self.0;
                let contiguous = |l: &candle_core::Layout, what: &str| {
                    l.contiguous_offsets().ok_or_else(|| {
                        candle_core::Error::Msg(format!("group-norm: {what} is strided"))
                    })
                };
                let (a, b) = contiguous(layout, "input")?;
                let src = src.slice(a..b);
                let (a, b) = contiguous(weight_layout, "weight")?;
                let weight = weight.slice(a..b);
                let (a, b) = contiguous(bias_layout, "bias")?;
                let bias = bias.slice(a..b);
                let dims = layout.shape().dims();
                if dims.len() < 2 {
                    candle_core::bail!(
                        "group-norm: input of rank {} (expected [B, C, ...])",
                        dims.len()
                    );
                }
                let (batch, channels) = (dims[0], dims[1]);
                let spatial: usize = dims[2..].iter().product();
                if op.groups == 0 || channels % op.groups != 0 {
                    candle_core::bail!("group-norm: {channels} channels in {} groups", op.groups);
                }
                if weight_layout.shape().elem_count() != channels
                    || bias_layout.shape().elem_count() != channels
                {
                    candle_core::bail!("group-norm: weight/bias do not have {channels} values");
                }
                let elements = layout.shape().elem_count();
                let cfg = LaunchConfig {
                    grid_dim: ((batch * op.groups) as u32, 1, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                };
                let func =
                    dev.get_or_load_custom_func(&kernel_name::<T>("group_norm"), "ipcompose", PTX)?;
                // SAFETY: every element is written by the kernel.
                let dst = unsafe { dev.alloc::<T>(elements)? };
                let (channels, spatial, groups) =
                    (channels as i32, spatial as i32, op.groups as i32);
                let silu = i32::from(op.silu);
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                builder.arg(&weight);
                builder.arg(&bias);
                builder.arg(&channels);
                builder.arg(&spatial);
                builder.arg(&groups);
                builder.arg(&op.eps);
                builder.arg(&silu);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(dst)
            }
        }

        let dev = s1.device();
        let slice = Launch(self).map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
        let dst = candle_core::cuda_backend::CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((dst, l1.shape().clone()))
    }
}

impl candle_core::CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "ipcompose-geglu"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("ipcompose's GEGLU kernel runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
        };
        use candle_core::cuda_backend::{kernel_name, Map1, WrapErr};
        use candle_core::{CudaDevice, WithDType};

        struct Launch;
        impl Map1 for Launch {
            fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
                &self,
                src: &CudaSlice<T>,
                dev: &CudaDevice,
                layout: &candle_core::Layout,
            ) -> Result<CudaSlice<T>> {
                let Some((a, b)) = layout.contiguous_offsets() else {
                    candle_core::bail!("geglu: the projection is strided")
                };
                let src = src.slice(a..b);
                let dims = layout.shape().dims();
                let width = dims.last().copied().unwrap_or(0);
                let half = width / 2;
                let rows = layout.shape().elem_count().checked_div(width).unwrap_or(0);
                let total = rows * half;
                let func =
                    dev.get_or_load_custom_func(&kernel_name::<T>("geglu"), "ipcompose", PTX)?;
                // SAFETY: every element is written by the kernel.
                let dst = unsafe { dev.alloc::<T>(total.max(1))? };
                let blocks = total.div_ceil(256).clamp(1, 65_535) as u32;
                let cfg = LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (rows, half) = (rows as u64, half as u64);
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                builder.arg(&rows);
                builder.arg(&half);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(dst)
            }
        }

        let dev = storage.device();
        let slice = Launch.map(&storage.slice, dev, layout)?;
        let mut dims = layout.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        let dst = candle_core::cuda_backend::CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((dst, candle_core::Shape::from(dims)))
    }
}

#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ipcompose.ptx"));
