//! Sources of the fresh Gaussian noise that ancestral sampling (Euler a, DDIM with η > 0) adds.

use std::collections::VecDeque;

use candle_core::{Device, Result, Tensor};

use crate::NoiseSource;

/// Standard normal noise from candle's generator for the device (seed it with
/// `Device::set_seed`).
#[derive(Debug, Default, Clone, Copy)]
pub struct GaussianNoise;

impl NoiseSource for GaussianNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, device)
    }
}

/// Replays given tensors in order, e.g. noise recorded from a reference run so a parity test
/// does not depend on torch's generator.
#[derive(Debug, Default, Clone)]
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
        }
    }

    /// How many tensors are left to replay.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let next = self
            .queue
            .pop_front()
            .ok_or_else(|| candle_core::Error::Msg("replayed noise is exhausted".to_owned()))?;
        if next.dims() != shape {
            return Err(candle_core::Error::Msg(format!(
                "replayed noise has shape {:?}, the step needs {shape:?}",
                next.dims()
            )));
        }
        next.to_device(device)
    }
}
