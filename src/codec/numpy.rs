//! NumPy `.npy` (the only input) and `.npz` (inputs by name): NumPy's own
//! headers read by hand for a bulk copy, anything else through `npyz`.

use std::io::{Cursor, Read};

use half::f16;

use crate::error::Result;
use crate::tensor::{Data, Tensor};

use super::bad;
use crate::tensor::Signature;

/// The longest .npy header read, as NumPy's own `np.load` allows
/// (`max_header_size`): a header is a few dozen bytes, and a hostile one
/// must not cost its length in parsing.
const MAX_HEADER: usize = 10_000;

/// Checks that `bytes` (a whole .npy) has a header no longer than
/// [`MAX_HEADER`]. Before any parser sees it.
fn check_header(name: &str, bytes: &[u8]) -> Result<()> {
    let prefix = if bytes.get(6) == Some(&1) { 10 } else { 12 };
    match npy_data_start(bytes) {
        Some(start) if start - prefix > MAX_HEADER => {
            Err(bad(format!("input {name:?}: .npy header longer than {MAX_HEADER} bytes")))
        }
        _ => Ok(()),
    }
}

pub(super) fn npy_tensor(name: &str, bytes: &[u8], budget: &mut u64) -> Result<Tensor> {
    check_header(name, bytes)?;
    if let Some(t) = numpy_header(bytes).and_then(|layout| npy_bulk(name, &layout, bytes, budget)) {
        return t;
    }
    // npyz's messages can quote the header: the reason names none of it.
    let npy = npyz::NpyFile::new(bytes).map_err(|_| bad(format!("input {name:?}: malformed .npy header")))?;
    if let Some(t) = npyz_layout(&npy, bytes).and_then(|layout| npy_bulk(name, &layout, bytes, budget)) {
        return t;
    }
    npy_file_tensor(name, npy, budget)
}

/// A C-order array of little-endian (or one-byte) numbers: what
/// [`npy_bulk`] copies out in one go.
pub(super) struct Layout {
    /// NumPy's kind: `b` bool, `u` unsigned, `i` signed, `f` float.
    pub(super) kind: u8,
    /// Bytes per element.
    pub(super) size: usize,
    pub(super) shape: Vec<usize>,
    /// Where the data starts.
    pub(super) start: usize,
}

/// The header exactly as NumPy's `np.save` writes it,
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }`, read
/// without a parser: it is on every .npy request's path, and npyz's general
/// Python-literal parser cost more than the rest of a small request's
/// decode. `None` for anything else, which npyz then reads.
pub(super) fn numpy_header(bytes: &[u8]) -> Option<Layout> {
    let start = npy_data_start(bytes)?;
    let header = bytes.get(if bytes[6] == 1 { 10 } else { 12 }..start)?; // version checked above
    let rest = std::str::from_utf8(header).ok()?.trim_end().strip_prefix("{'descr': '")?;
    let (descr, rest) = rest.split_once('\'')?;
    let (dims, rest) = rest.strip_prefix(", 'fortran_order': False, 'shape': (")?.split_once(')')?;
    if rest != ", }" {
        return None;
    }
    // "()" is a scalar, "(3,)" one dimension, "(1, 16)" two.
    let dims = dims.strip_suffix(',').unwrap_or(dims);
    let shape = if dims.is_empty() {
        Vec::new()
    } else {
        dims.split(',').map(|d| d.trim_start().parse().ok()).collect::<Option<_>>()?
    };
    let (order, kind, size) = (descr.as_bytes().first()?, descr.as_bytes().get(1)?, descr.get(2..)?.parse().ok()?);
    matches!((order, size), (b'<', _) | (b'|', 1)).then_some(Layout { kind: *kind, size, shape, start })
}

/// The same, from a header npyz parsed.
pub(super) fn npyz_layout(npy: &npyz::NpyFile<&[u8]>, bytes: &[u8]) -> Option<Layout> {
    let npyz::DType::Plain(ts) = npy.dtype() else { return None };
    if npy.order() != npyz::Order::C || ts.endianness() == npyz::Endianness::Big {
        return None;
    }
    let kind = match ts.type_char() {
        npyz::TypeChar::Bool => b'b',
        npyz::TypeChar::Uint => b'u',
        npyz::TypeChar::Int => b'i',
        npyz::TypeChar::Float => b'f',
        _ => return None,
    };
    let shape = npy.shape().iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
    Some(Layout { kind, size: ts.size_field() as usize, shape, start: npy_data_start(bytes)? })
}

/// The common case, fast: the data copied out in bulk rather than element
/// by element. `None` for a type it does not know or a size past `budget`
/// (npyz reads it then, and reports what is wrong).
pub(super) fn npy_bulk(name: &str, layout: &Layout, bytes: &[u8], budget: &mut u64) -> Option<Result<Tensor>> {
    let Layout { kind, size, ref shape, start } = *layout;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let needed = count.checked_mul(size)?;
    if needed as u64 > *budget {
        return None; // the general path reports it
    }
    let data = bytes.get(start..)?;
    if data.len() < needed {
        return Some(Err(bad(format!(
            "input {name:?}: truncated or malformed .npy data: {needed} bytes expected, {} present",
            data.len()
        ))));
    }
    let data = &data[..needed];
    macro_rules! le {
        ($variant:ident, $t:ty) => {
            Data::$variant(bytemuck::pod_collect_to_vec::<u8, $t>(data))
        };
    }
    let data = match (kind, size) {
        (b'b', 1) => {
            if data.iter().any(|&b| b > 1) {
                return Some(Err(bad(format!("input {name:?}: a bool .npy holds a value other than 0 or 1"))));
            }
            Data::Bool(data.iter().map(|&b| b == 1).collect())
        }
        (b'u', 1) => Data::Uint8(data.to_vec()),
        (b'i', 1) => le!(Int8, i8),
        (b'u', 2) => le!(Uint16, u16),
        (b'i', 2) => le!(Int16, i16),
        (b'u', 4) => le!(Uint32, u32),
        (b'i', 4) => le!(Int32, i32),
        (b'u', 8) => le!(Uint64, u64),
        (b'i', 8) => le!(Int64, i64),
        (b'f', 2) => le!(Float16, f16),
        (b'f', 4) => le!(Float32, f32),
        (b'f', 8) => le!(Float64, f64),
        _ => return None,
    };
    *budget -= needed as u64;
    Some(Tensor::new(name, shape.clone(), data))
}

/// Where an .npy file's data starts: after the magic, version, header
/// length and header.
pub(super) fn npy_data_start(bytes: &[u8]) -> Option<usize> {
    Some(match bytes.get(6)? {
        1 => 10 + u16::from_le_bytes(bytes.get(8..10)?.try_into().ok()?) as usize,
        2 | 3 => 12 + u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize,
        _ => return None,
    })
}

/// The whole size of a request whose first bytes are a NumPy-written .npy
/// header (so a buffer can be sized once); `None` for anything else, or a
/// header cut short. Only a hint: nothing is checked against it.
pub fn declared_len(first: &[u8]) -> Option<u64> {
    if !first.starts_with(b"\x93NUMPY") {
        return None;
    }
    let layout = numpy_header(first)?;
    let data = layout.shape.iter().try_fold(layout.size as u64, |a, &d| a.checked_mul(d as u64))?;
    data.checked_add(layout.start as u64)
}

/// Reads one array, if its decoded size fits what is left of `budget`.
pub(super) fn npy_file_tensor<R: std::io::Read>(name: &str, npy: npyz::NpyFile<R>, budget: &mut u64) -> Result<Tensor> {
    if npy.order() == npyz::Order::Fortran {
        return Err(bad(format!("input {name:?}: Fortran-order .npy arrays are not supported (use C order)")));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(ts) = npy.dtype() else {
        return Err(bad(format!("input {name:?}: structured .npy arrays are not supported")));
    };
    let bytes = npy.shape().iter().try_fold(ts.size_field(), |acc, &d| acc.checked_mul(d));
    match bytes {
        Some(b) if b <= *budget => *budget -= b,
        _ => {
            return Err(bad(format!(
                "input {name:?}: shape {shape:?} decodes to more than the limit of {} bytes",
                *budget
            )))
        }
    }
    use npyz::TypeChar as C;
    let read_err = |e: std::io::Error| bad(format!("input {name:?}: truncated or malformed .npy data: {e}"));
    macro_rules! read {
        ($variant:ident) => {
            Data::$variant(npy.into_vec().map_err(read_err)?)
        };
    }
    let data = match (ts.type_char(), ts.size_field()) {
        (C::Bool, 1) => read!(Bool),
        (C::Uint, 1) => read!(Uint8),
        (C::Int, 1) => read!(Int8),
        (C::Uint, 2) => read!(Uint16),
        (C::Int, 2) => read!(Int16),
        (C::Uint, 4) => read!(Uint32),
        (C::Int, 4) => read!(Int32),
        (C::Uint, 8) => read!(Uint64),
        (C::Int, 8) => read!(Int64),
        (C::Float, 2) => read!(Float16),
        (C::Float, 4) => read!(Float32),
        (C::Float, 8) => read!(Float64),
        _ => return Err(bad(format!("input {name:?}: .npy dtype {ts} is not supported"))),
    };
    Tensor::new(name, shape, data)
}

/// The arrays of an .npz (a zip of .npy files), each bounded before it is
/// read: no more members than the model has inputs, and each member's
/// declared size within what is left of `budget` (plus its header), read
/// no further than that.
pub(super) fn npz_tensors(bytes: &[u8], sig: &Signature, budget: &mut u64) -> Result<Vec<Tensor>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|_| bad("malformed .npz (not a zip archive)"))?;
    if zip.len() > sig.inputs.len() {
        return Err(bad(format!(".npz holds {} arrays; the model takes {} inputs", zip.len(), sig.inputs.len())));
    }
    (0..zip.len())
        .map(|i| {
            let mut member = zip.by_index(i).map_err(|_| bad(format!("malformed .npz (member {i})")))?;
            let name = member.name().strip_suffix(".npy").unwrap_or(member.name()).to_string();
            let size = member.size();
            if size > budget.saturating_add(MAX_HEADER as u64 + 128) {
                return Err(bad(format!("input {name:?}: decodes to more than the limit of {budget} bytes")));
            }
            // Grown as bytes come, not reserved from what the zip claims.
            let mut npy = Vec::with_capacity(size.min(1 << 20) as usize);
            (&mut member)
                .take(size + 1)
                .read_to_end(&mut npy)
                .map_err(|_| bad(format!("input {name:?}: malformed .npz member")))?;
            if npy.len() as u64 != size {
                return Err(bad(format!("input {name:?}: .npz member is not the size it declares")));
            }
            npy_tensor(&name, &npy, budget)
        })
        .collect()
}

/// Writes a tensor as .npy with the header NumPy's `np.save` writes
/// (`{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }`,
/// padded with spaces so the data starts at a multiple of 64): the mirror
/// of [`numpy_header`], as cheap, since every .npy response carries one.
pub(super) fn write_npy(t: &Tensor, out: &mut impl std::io::Write) -> std::io::Result<()> {
    use bytemuck::cast_slice as bytes;
    let bools: Vec<u8>;
    let (descr, data): (&str, &[u8]) = match &t.data {
        Data::Bool(v) => {
            bools = v.iter().map(|&b| b as u8).collect();
            ("|b1", &bools)
        }
        Data::Uint8(v) => ("|u1", v),
        Data::Int8(v) => ("|i1", bytes(v)),
        Data::Uint16(v) => ("<u2", bytes(v)),
        Data::Int16(v) => ("<i2", bytes(v)),
        Data::Uint32(v) => ("<u4", bytes(v)),
        Data::Int32(v) => ("<i4", bytes(v)),
        Data::Uint64(v) => ("<u8", bytes(v)),
        Data::Int64(v) => ("<i8", bytes(v)),
        Data::Float16(v) => ("<f2", bytes(v)),
        Data::Float32(v) => ("<f4", bytes(v)),
        Data::Float64(v) => ("<f8", bytes(v)),
        Data::String(_) => {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "text outputs have no .npy form"))
        }
    };
    let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Format 1.0 counts the header in 16 bits; 2.0 in 32, for huge ranks.
    let padded_in = |prefix: usize| (prefix + header.len() + 1).next_multiple_of(64) - prefix;
    let v1 = padded_in(10) <= 0xffff;
    let padded = padded_in(if v1 { 10 } else { 12 });
    header.extend(std::iter::repeat_n(' ', padded - header.len() - 1));
    header.push('\n');
    out.write_all(b"\x93NUMPY")?;
    if v1 {
        out.write_all(&[1, 0])?;
        out.write_all(&(header.len() as u16).to_le_bytes())?;
    } else {
        out.write_all(&[2, 0])?;
        out.write_all(&(header.len() as u32).to_le_bytes())?;
    }
    out.write_all(header.as_bytes())?;
    out.write_all(data)
}
