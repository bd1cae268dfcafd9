//! The codecs' unit tests.

use super::numpy::{npyz_layout, numpy_header};
use super::*;
use crate::tensor::{DType, Data, TensorSpec};

fn sig(inputs: &[(&str, DType, &[i64])]) -> Signature {
    Signature {
        inputs: inputs
            .iter()
            .map(|(n, d, s)| TensorSpec { name: n.to_string(), dtype: *d, shape: s.to_vec(), dim_names: vec![] })
            .collect(),
        outputs: vec![],
        generates: false,
    }
}

fn decode_test(bytes: &[u8], sig: &Signature) -> Result<Request> {
    decode(bytes, sig, 1 << 20)
}

fn err(bytes: &[u8], sig: &Signature) -> String {
    let e = decode_test(bytes, sig).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    e.to_string()
}

#[test]
fn json_array_takes_the_models_dtype() {
    let s = sig(&[("x", DType::Float32, &[-1, 2])]);
    let r = decode_test(b" [[1, 2.5], [3, 4]]\n", &s).unwrap();
    assert_eq!(r.codec, Codec::JsonArray);
    assert_eq!(r.inputs[0].shape, [2, 2]);
    assert_eq!(r.inputs[0].data, Data::Float32(vec![1.0, 2.5, 3.0, 4.0]));
    let s = sig(&[("ids", DType::Int64, &[-1])]);
    assert_eq!(decode_test(b"[1, -2]", &s).unwrap().inputs[0].data, Data::Int64(vec![1, -2]));
}

#[test]
fn json_errors_name_the_input() {
    let ints = sig(&[("ids", DType::Uint8, &[-1])]);
    assert_eq!(err(b"[1, 2.5]", &ints), "input \"ids\": a float (2.5) where an integer (uint8) is required");
    assert_eq!(err(b"[1, 300]", &ints), "input \"ids\": 300 is out of range for uint8");
    assert_eq!(err(b"[[1], [2, 3]]", &ints), "input \"ids\": ragged array (not a rectangular shape)");
    assert!(err(b"[1, 2", &ints).starts_with("malformed JSON"));
    assert_eq!(err(b"hello", &ints), "unrecognized input: expected JSON, .npy or .npz");
    assert_eq!(err(b"", &ints), "empty request");
    assert_eq!(err(br#"{"nope": [1]}"#, &ints), "unknown input \"nope\" (the model's inputs: ids)");
    let two = sig(&[("a", DType::Float32, &[-1]), ("b", DType::Float32, &[-1])]);
    assert!(err(b"[1]", &two).contains("it has 2 (a, b)"));
}

#[test]
fn json_object_and_scalars() {
    let s = sig(&[("x", DType::Float32, &[1, 2]), ("sr", DType::Int64, &[])]);
    let r = decode_test(br#"{"x": [[1, 2]], "sr": 16000}"#, &s).unwrap();
    assert_eq!(r.codec, Codec::JsonObject);
    let sr = r.inputs.iter().find(|t| t.name == "sr").unwrap();
    assert_eq!((sr.shape.as_slice(), &sr.data), (&[][..], &Data::Int64(vec![16000])));
}

#[test]
fn kserve_round_trip() {
    let s = sig(&[("x", DType::Float32, &[-1, 2])]);
    let body = br#"{"id": "42", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}"#;
    let r = decode_test(body, &s).unwrap();
    assert_eq!(r.codec, Codec::KServe);
    assert_eq!(r.inputs[0].data, Data::Float32(vec![1.0, 2.0]));
    let out = Tensor::new("y", vec![1, 2], Data::Float32(vec![3.0, 4.0])).unwrap();
    let bytes = encode(&r, vec![out], "m", 3).unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"id": "42", "model_name": "m", "model_version": "3",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [3.0, 4.0]}]})
    );
    let wrong = br#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2, 3]}]}"#;
    assert_eq!(err(wrong, &s), "input \"x\": shape [2] needs 2 elements, got 3");
    let unknown = br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "BF16", "data": ["a"]}]}"#;
    assert_eq!(err(unknown, &s), "input \"x\": unsupported KServe datatype \"BF16\"");
}

/// Headers as NumPy 2's `np.save` wrote them (the test's literals).
#[test]
fn npy_headers_are_numpys_own() {
    let cases = [
        (Tensor::new("y", vec![1, 16], Data::Float32(vec![0.5; 16])), "'<f4'", "(1, 16)"),
        (Tensor::new("y", vec![], Data::Int64(vec![7])), "'<i8'", "()"),
        (Tensor::new("y", vec![3], Data::Bool(vec![true, false, true])), "'|b1'", "(3,)"),
        (Tensor::new("y", vec![2, 0, 3], Data::Float16(vec![])), "'<f2'", "(2, 0, 3)"),
    ];
    for (t, descr, shape) in cases {
        let t = t.unwrap();
        let mut bytes = Vec::new();
        write_npy(&t, &mut bytes).unwrap();
        let dict = format!("{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}");
        let header = format!("\u{93}NUMPY\u{1}\0v\0{dict:<117}\n");
        let header: Vec<u8> = header.chars().map(|c| c as u8).collect(); // one byte each
        assert_eq!(&bytes[..128], &header[..], "{shape}");
        let layout = numpy_header(&bytes).expect("read back on the fast path");
        assert_eq!((layout.shape, layout.start), (t.shape.clone(), 128));
        assert_eq!(bytes.len(), 128 + t.data.byte_len());
    }
}

#[test]
fn npy_round_trip_and_truncation() {
    let s = sig(&[("x", DType::Int16, &[-1, 3])]);
    let t = Tensor::new("x", vec![2, 3], Data::Int16(vec![1, -2, 3, -4, 5, i16::MAX])).unwrap();
    let mut bytes = Vec::new();
    write_npy(&t, &mut bytes).unwrap();
    let r = decode_test(&bytes, &s).unwrap();
    assert_eq!((r.codec, &r.inputs[0]), (Codec::Npy, &t));
    let e = err(&bytes[..bytes.len() - 3], &s);
    assert!(e.contains("truncated or malformed .npy"), "{e}");
    let e = err(&bytes[..20], &s);
    assert!(e.contains("malformed .npy"), "{e}");
    let out = encode(&r, vec![t.clone()], "m", 1).unwrap();
    assert_eq!(out, bytes);
}

#[test]
fn hostile_shapes_are_refused_without_allocating() {
    let s = sig(&[("x", DType::Float32, &[-1])]);
    // A first element nested 5 deep, 1024 wide: a naive reader would
    // reserve 1024^5 elements.
    let mut v = String::from("0");
    for _ in 0..5 {
        v = format!("[{v}{}]", ",0".repeat(1023));
    }
    assert!(err(v.as_bytes(), &s).contains("ragged"));
    let huge = br#"{"inputs": [{"name": "x", "shape": [4294967296, 4294967296], "datatype": "FP32", "data": [1]}]}"#;
    assert!(err(huge, &s).contains("too large"));
    // An .npy whose header claims 2^40 elements, with 8 bytes of data.
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }";
    let header = format!("{header:<117}\n");
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header.as_bytes());
    npy.extend([0u8; 8]);
    assert_eq!(err(&npy, &s), "input \"x\": shape [1099511627776] decodes to more than the limit of 1048576 bytes");
}

/// An .npy file with this header text and no data.
fn npy_header_only(header: &str) -> Vec<u8> {
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16 + 1).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.push(b'\n');
    out
}

#[test]
fn numpys_own_headers_are_read_without_npyz_and_agree_with_it() {
    for (header, kind, size, shape) in [
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }   ", b'f', 4, vec![1, 16]),
        ("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", b'i', 8, vec![3]),
        ("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", b'f', 8, vec![]),
        ("{'descr': '|b1', 'fortran_order': False, 'shape': (2, 3), }", b'b', 1, vec![2, 3]),
        ("{'descr': '|u1', 'fortran_order': False, 'shape': (0, 4, 5), }", b'u', 1, vec![0, 4, 5]),
    ] {
        let bytes = npy_header_only(header);
        let fast = numpy_header(&bytes).unwrap_or_else(|| panic!("{header}"));
        let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
        let slow = npyz_layout(&npy, &bytes).unwrap();
        assert_eq!((fast.kind, fast.size, &fast.shape, fast.start), (kind, size, &shape, bytes.len()), "{header}");
        assert_eq!((slow.kind, slow.size, &slow.shape, slow.start), (kind, size, &shape, bytes.len()), "{header}");
    }
    // Anything else is left to npyz.
    for header in [
        "{'descr': '>f4', 'fortran_order': False, 'shape': (1, 16), }",
        "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 16), }",
        "{'fortran_order': False, 'descr': '<f4', 'shape': (1, 16), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,, 16), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 16), }",
        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
    ] {
        assert!(numpy_header(&npy_header_only(header)).is_none(), "{header}");
    }
}

#[test]
fn an_npy_header_declares_the_request_size() {
    let mut bytes = npy_header_only("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 5), }");
    let whole = bytes.len() as u64 + 60;
    assert_eq!(declared_len(&bytes), Some(whole));
    bytes.extend_from_slice(&[0; 20]);
    assert_eq!(declared_len(&bytes), Some(whole), "a partial body");
    assert_eq!(declared_len(&bytes[..20]), None, "a header cut short");
    assert_eq!(declared_len(b"[[1.0]]"), None);
}

#[test]
fn npz_round_trip() {
    let s = sig(&[("a", DType::Float64, &[-1]), ("b", DType::Bool, &[2])]);
    let a = Tensor::new("a", vec![3], Data::Float64(vec![1.0, 2.0, 3.0])).unwrap();
    let b = Tensor::new("b", vec![2], Data::Bool(vec![true, false])).unwrap();
    let request = Request { codec: Codec::Npz, inputs: vec![], id: None, outputs: None, prompt: None };
    let bytes = encode(&request, vec![a.clone(), b.clone()], "m", 1).unwrap();
    let r = decode_test(&bytes, &s).unwrap();
    assert_eq!(r.codec, Codec::Npz);
    let mut got = r.inputs;
    got.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(got, vec![a, b]);
}

#[test]
fn an_empty_request_is_no_inputs_in_each_codec() {
    let none = sig(&[]);
    // What np.savez(f) writes: a zip of nothing.
    let empty_npz = b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    for (bytes, codec) in
        [(&b"{}"[..], Codec::JsonObject), (br#"{"inputs": []}"#, Codec::KServe), (&empty_npz[..], Codec::Npz)]
    {
        let r = decode_test(bytes, &none).unwrap();
        assert_eq!((r.codec, r.inputs.len()), (codec, 0), "{}", String::from_utf8_lossy(bytes));
    }
    // A model that does take inputs says which are missing.
    let one = sig(&[("x", DType::Float32, &[-1])]);
    let r = decode_test(b"{}", &one).unwrap();
    let e = one.check(r.inputs).unwrap_err();
    assert!(e.to_string().contains("missing input \"x\""), "{e}");
}

/// An .npz of the given members, deflated.
fn npz_of(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut npz = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        npz.start_file(*name, options).unwrap();
        npz.write_all(bytes).unwrap();
    }
    npz.finish().unwrap().into_inner()
}

/// A version-2 .npy whose header is `n` spaces: a few KB deflated.
fn spaces_header(n: u32) -> Vec<u8> {
    let mut npy = b"\x93NUMPY\x02\x00".to_vec();
    npy.extend_from_slice(&n.to_le_bytes());
    npy.extend(std::iter::repeat_n(b' ', n as usize - 1));
    npy.push(b'\n');
    npy
}

#[test]
fn hostile_npz_members_are_bounded_before_they_are_read() {
    let one = sig(&[("x", DType::Float32, &[-1])]);
    // A header of 16 MiB of spaces deflates to ~16 KB; it is refused by
    // its declared length, unparsed, with a short reason.
    let bomb = npz_of(&[("x.npy", spaces_header(16 << 20))]);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let e = decode(&bomb, &one, 64 << 20).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("header longer than 10000 bytes"), "{e}");
    assert!(e.to_string().len() <= 200, "{e}");
    // Past the limit by its declared size: refused before it is inflated.
    let e = decode(&bomb, &one, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("decodes to more than the limit"), "{e}");
    // More arrays than the model has inputs.
    let x = npz_of(&[("x.npy", Vec::new()), ("y.npy", Vec::new())]);
    let e = decode_test(&x, &one).unwrap_err();
    assert!(e.to_string().contains(".npz holds 2 arrays; the model takes 1 inputs"), "{e}");
    // A plain .npy with a long header is refused the same way.
    let e = decode(&spaces_header(1 << 20), &one, 64 << 20).unwrap_err();
    assert!(e.to_string().contains("header longer than 10000 bytes"), "{e}");
}

#[test]
fn malformed_headers_are_not_quoted_back() {
    let one = sig(&[("x", DType::Float32, &[-1])]);
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let header = b"{'descr': 'SECRET-SECRET', 'fortran_order': False, 'shape': (1,), }\n";
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header);
    let e = decode_test(&npy, &one).unwrap_err().to_string();
    assert!(!e.contains("SECRET"), "{e}");
}

#[test]
fn nan_and_infinities_survive_json_both_ways() {
    let t = Tensor::new("y", vec![4], Data::Float32(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.5])).unwrap();
    for codec in [Codec::JsonArray, Codec::KServe] {
        let request = Request { codec, inputs: vec![], id: None, outputs: None, prompt: None };
        let text = String::from_utf8(encode(&request, vec![t.clone()], "m", 1).unwrap()).unwrap();
        assert!(text.contains(r#"["NaN","Infinity","-Infinity",0.5]"#), "{text}");
    }
    let s = sig(&[("x", DType::Float64, &[-1])]);
    let r = decode_test(br#"["NaN", "Infinity", "-Infinity", 1]"#, &s).unwrap();
    let Data::Float64(v) = &r.inputs[0].data else { panic!() };
    assert!(v[0].is_nan() && v[1] == f64::INFINITY && v[2] == f64::NEG_INFINITY && v[3] == 1.0);
    // Any other string is still not a number.
    let e = err(br#"["nan"]"#, &s);
    assert!(e.contains("expected a number (float64), got a string"), "{e}");
}

fn strings(v: &[&str]) -> Data {
    Data::String(v.iter().map(|s| s.to_string()).collect())
}

#[test]
fn text_models_take_lines_json_strings_and_kserve_bytes() {
    let s = sig(&[("text", DType::String, &[-1])]);
    let text = |bytes: &[u8]| {
        let r = decode_test(bytes, &s).unwrap();
        (r.codec, r.inputs[0].shape.clone(), r.inputs[0].data.clone())
    };
    assert_eq!(text(b"a sentence\n"), (Codec::Text, vec![1], strings(&["a sentence"])));
    assert_eq!(text(b"one\r\ntwo\n\nfour"), (Codec::Text, vec![4], strings(&["one", "two", "", "four"])));
    assert_eq!(text("café 日本語 😀".as_bytes()), (Codec::Text, vec![1], strings(&["café 日本語 😀"])));
    // Text that starts like JSON but is not JSON is text.
    assert_eq!(text(b"[citation needed]\n"), (Codec::Text, vec![1], strings(&["[citation needed]"])));
    assert_eq!(text(br#"["a", "b"]"#), (Codec::JsonArray, vec![2], strings(&["a", "b"])));
    assert_eq!(text(br#"{"text": ["a"]}"#), (Codec::JsonObject, vec![1], strings(&["a"])));
    let kserve = br#"{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x", "y"]}]}"#;
    assert_eq!(text(kserve), (Codec::KServe, vec![2], strings(&["x", "y"])));

    assert!(err(b"\n\n  \n", &s).contains("empty request"));
    let e = err(b"ok\xff\xfe", &s);
    assert!(e.contains("must be UTF-8: invalid byte at offset 2"), "{e}");
    assert!(err(b"[1, 2]", &s).contains("expected a string, got a number"));
    // A model with numeric inputs still refuses text.
    assert!(err(b"a sentence", &sig(&[("x", DType::Float32, &[-1])])).contains("unrecognized input"));
}

#[test]
fn text_answers_have_one_row_per_line() {
    let s = sig(&[("text", DType::String, &[-1])]);
    let request = decode_test(b"a\nb\n", &s).unwrap();
    let out = Tensor::new("embedding", vec![2, 2], Data::Float32(vec![0.5, 1.0, -1.0, 0.0])).unwrap();
    let bytes = encode(&request, vec![out.clone()], "m", 1).unwrap();
    assert_eq!(String::from_utf8(bytes.clone()).unwrap(), "[[0.5,1.0],\n[-1.0,0.0]]\n");
    let parsed: Vec<Vec<f32>> = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(parsed, [[0.5, 1.0], [-1.0, 0.0]]);
    // JSON in, JSON out as for any model.
    let request = decode_test(br#"["a", "b"]"#, &s).unwrap();
    assert_eq!(encode(&request, vec![out], "m", 1).unwrap(), b"[[0.5,1.0],[-1.0,0.0]]\n");
}
