//! PyTorch's legacy (pre-1.6, non-zip) `torch.save` format, which older checkpoints such as
//! OpenPose's `body_pose_model.pth` use: a magic-number pickle, a protocol-version pickle, a
//! system-info pickle, the object pickle (tensors refer to storages by key), a pickle listing
//! the storage keys, then each storage as a little-endian `i64` element count and its bytes.
//! candle's pickle reader parses the pickles; this module reads the framing and the storages.

use std::collections::HashMap;
use std::io::{BufRead, Cursor, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Tensor};

/// `pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)`: torch's magic number.
const MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e";

/// Whether the file starts as a legacy `torch.save` file does.
pub(crate) fn is_legacy(path: &Path) -> bool {
    let mut head = [0u8; MAGIC.len()];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| head == MAGIC)
        .unwrap_or(false)
}

fn pickle<R: BufRead>(r: &mut R) -> Result<Object, String> {
    let mut stack = Stack::empty();
    stack.read_loop(r).map_err(|e| e.to_string())?;
    stack.finalize().map_err(|e| e.to_string())
}

/// Every tensor of a legacy file holding a (possibly ordered) dict of tensors, on the CPU.
pub(crate) fn read(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if !bytes.starts_with(MAGIC) {
        return Err("not a legacy torch.save file (no magic number)".to_string());
    }
    let mut r = Cursor::new(&bytes[MAGIC.len()..]);
    let _protocol = pickle(&mut r)?;
    let _sys_info = pickle(&mut r)?;
    let object = pickle(&mut r)?;
    let keys = match pickle(&mut r)? {
        Object::List(keys) => keys
            .into_iter()
            .map(|k| k.unicode().map_err(|o| format!("storage key {o:?}")))
            .collect::<Result<Vec<String>, String>>()?,
        other => return Err(format!("expected the storage key list, found {other:?}")),
    };
    // Storages follow in key order: i64 element count, then the data.
    let mut storages: HashMap<String, (usize, usize)> = HashMap::new();
    let mut pos = MAGIC.len() + r.position() as usize;
    let infos: Vec<candle_core::pickle::TensorInfo> = match object {
        Object::Dict(items) => items
            .into_iter()
            .filter_map(|(name, value)| value.into_tensor_info(name, Path::new("")).ok().flatten())
            .collect(),
        _ => return Err("the file does not hold a dict of tensors".to_string()),
    };
    let size_of = |key: &str| {
        infos
            .iter()
            .find(|i| i.path.trim_start_matches('/') == key)
            .map(|i| i.dtype.size_in_bytes())
    };
    for key in &keys {
        let count_bytes = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("storage `{key}` is cut short"))?;
        let count = i64::from_le_bytes(count_bytes.try_into().map_err(|_| "short read")?);
        pos += 8;
        // A storage no tensor uses has an unknown element size; it must be the last one to
        // be skipped safely.
        let elem = size_of(key).ok_or_else(|| format!("storage `{key}` is used by no tensor"))?;
        let len = count as usize * elem;
        if pos + len > bytes.len() {
            return Err(format!("storage `{key}` is cut short"));
        }
        storages.insert(key.clone(), (pos, len));
        pos += len;
    }
    let mut tensors = HashMap::new();
    for info in infos {
        let key = info.path.trim_start_matches('/');
        let &(start, len) = storages
            .get(key)
            .ok_or_else(|| format!("tensor `{}` refers to a missing storage", info.name))?;
        if !info.layout.is_contiguous() {
            return Err(format!("tensor `{}` is not contiguous", info.name));
        }
        let offset = info.layout.start_offset();
        let nbytes = info.layout.shape().elem_count() * info.dtype.size_in_bytes();
        if offset + nbytes > len {
            return Err(format!("tensor `{}` reaches past its storage", info.name));
        }
        let data = &bytes[start + offset..start + offset + nbytes];
        let tensor =
            Tensor::from_raw_buffer(data, info.dtype, info.layout.shape().dims(), &Device::Cpu)
                .map_err(|e| e.to_string())?;
        tensors.insert(info.name, tensor);
    }
    Ok(tensors)
}
