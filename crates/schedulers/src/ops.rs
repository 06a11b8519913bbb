//! Tensor-by-scalar arithmetic that stays on the tensor's device.
//!
//! torch evaluates `tensor * scalar` for float16/bfloat16 tensors with the scalar kept in
//! float32 ("opmath"), so reduced-precision tensors are widened for the operation instead of
//! rounding the scalar to their own precision first.

use candle_core::{DType, Result, Tensor};

fn is_reduced_precision(dtype: DType) -> bool {
    !matches!(dtype, DType::F32 | DType::F64)
}

fn in_float32<F>(tensor: &Tensor, operation: F) -> Result<Tensor>
where
    F: FnOnce(&Tensor) -> Result<Tensor>,
{
    if is_reduced_precision(tensor.dtype()) {
        operation(&tensor.to_dtype(DType::F32)?)?.to_dtype(tensor.dtype())
    } else {
        operation(tensor)
    }
}

/// `tensor * factor`, rounded once (an `affine` with zero offset is an exact multiply).
pub(crate) fn scale(tensor: &Tensor, factor: f32) -> Result<Tensor> {
    in_float32(tensor, |tensor| tensor.affine(f64::from(factor), 0.0))
}

/// `tensor / divisor` as a true division (torch's CPU kernel divides; multiplying by the
/// reciprocal would differ in the last bit).
pub(crate) fn divide(tensor: &Tensor, divisor: f32) -> Result<Tensor> {
    in_float32(tensor, |tensor| {
        // `full` fills on the device (no host-to-device copy per step).
        let divisor = Tensor::full(divisor, (), tensor.device())?.to_dtype(tensor.dtype())?;
        tensor.broadcast_div(&divisor)
    })
}

/// Brings two operands to a common dtype the way torch promotes float tensors.
pub(crate) fn promote(lhs: &Tensor, rhs: &Tensor) -> Result<(Tensor, Tensor)> {
    if lhs.dtype() == rhs.dtype() {
        return Ok((lhs.clone(), rhs.clone()));
    }
    let common = if lhs.dtype() == DType::F64 || rhs.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    Ok((lhs.to_dtype(common)?, rhs.to_dtype(common)?))
}

/// `lhs - rhs` with promotion.
pub(crate) fn sub(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let (lhs, rhs) = promote(lhs, rhs)?;
    lhs.sub(&rhs)
}

/// `lhs + rhs` with promotion.
pub(crate) fn add(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let (lhs, rhs) = promote(lhs, rhs)?;
    lhs.add(&rhs)
}
