//! ipcompose's own noise generator. It does not reproduce torch's generator: to compare with
//! diffusers exactly, pass the initial latents (and ancestral noise) from a file instead.
//!
//! The generator is ChaCha20 (`rand_chacha::ChaCha20Rng::seed_from_u64(seed)`) with standard
//! normal samples from `rand_distr::StandardNormal`, drawn in row-major order: the same seed
//! gives the same latents on every platform and device.

use candle_core::{Device, Tensor};
use ipcompose_schedulers::NoiseSource;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

pub struct SeededNoise {
    rng: ChaCha20Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Tensor::from_vec(values, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_unit_variance() {
        let dev = Device::Cpu;
        let a = SeededNoise::new(7).sample(&[1, 4, 32, 32], &dev).unwrap();
        let b = SeededNoise::new(7).sample(&[1, 4, 32, 32], &dev).unwrap();
        let c = SeededNoise::new(8).sample(&[1, 4, 32, 32], &dev).unwrap();
        let diff = |x: &Tensor, y: &Tensor| -> f32 {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(diff(&a, &b), 0.0);
        assert!(diff(&a, &c) > 0.1);
        let var: f32 = a.sqr().unwrap().mean_all().unwrap().to_scalar().unwrap();
        assert!((var - 1.0).abs() < 0.1, "variance {var}");
    }
}
