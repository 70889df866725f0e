//! Decoding: from a Kafka record value to the SINETStream message it carries.
//!
//! The archive stores what Kafka Connect's `SinetStreamConverter` extracted: the Avro `msg` bytes
//! exactly as carried (still compressed if the producer compressed them) and the producer's
//! `tstamp` in microseconds. This module finds those two fields and nothing more; it never
//! decompresses or decrypts.
//!
//! Wire format (`../shared/docs/compat.md`):
//!
//! ```text
//! v3: DF 03 00 00 | key version (u16, big endian) | body
//!     key version 0: body is a v2 message; > 0: body is encrypted
//! v2: C3 01 | fingerprint 1F 9C 0C 91 EB 33 66 4F | tstamp: zigzag varint long
//!     | msg: zigzag varint length, then the bytes
//! ```
//!
//! Guarantees: decoding never panics and never allocates in proportion to a length read from
//! the input (the payload is a borrowed slice of the value); every input that is not a complete
//! v2/v3 message gets an [`Undecodable`] reason.

use std::ops::Range;

/// The first four bytes of a SINETStream v3 message.
pub const V3_MARKER: [u8; 4] = [0xDF, 0x03, 0x00, 0x00];
/// Avro single-object encoding marker.
pub const V2_MARKER: [u8; 2] = [0xC3, 0x01];
/// CRC-64-AVRO fingerprint of SINETStream's `jp.ad.sinet.stream.message` schema, as on the wire.
pub const SCHEMA_FINGERPRINT: [u8; 8] = [0x1F, 0x9C, 0x0C, 0x91, 0xEB, 0x33, 0x66, 0x4F];

/// A decoded SINETStream message: where its payload lies in the record value, and its tstamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Producer's timestamp, microseconds since the epoch.
    pub tstamp_us: i64,
    /// Byte range of the Avro `msg` field inside the record value.
    pub msg: Range<usize>,
    /// Which envelope carried it.
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V2,
    V3,
}

/// Why a record value is not a message this archiver can decode. Each reason is a bounded,
/// stable label (used in metrics and logs) plus detail for the dead-letter reason object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Undecodable {
    #[error("encrypted SINETStream v3 message (key version {0}): it cannot be decoded without the key")]
    Encrypted(u16),
    #[error("no SINETStream envelope: the value starts with neither DF 03 (v3) nor C3 01 (v2)")]
    NoEnvelope,
    #[error("wrong SINETStream marker: the value starts with DF 03 but not DF 03 00 00")]
    WrongMarker,
    #[error("wrong Avro schema fingerprint {0}: not SINETStream's message schema")]
    WrongFingerprint(String),
    #[error("truncated message: {0}")]
    Truncated(&'static str),
    #[error("malformed Avro record: {0}")]
    Malformed(&'static str),
}

impl Undecodable {
    /// A short label for metrics: one of a fixed set.
    pub fn label(&self) -> &'static str {
        match self {
            Undecodable::Encrypted(_) => "encrypted",
            Undecodable::NoEnvelope => "no_envelope",
            Undecodable::WrongMarker => "wrong_marker",
            Undecodable::WrongFingerprint(_) => "wrong_fingerprint",
            Undecodable::Truncated(_) => "truncated",
            Undecodable::Malformed(_) => "malformed",
        }
    }
}

/// Decodes a record value as SINETStream v3 or v2.
pub fn decode(value: &[u8]) -> Result<Message, Undecodable> {
    if value.starts_with(&V3_MARKER[..2]) {
        if value.len() < V3_MARKER.len() {
            return Err(Undecodable::Truncated("v3 marker cut short"));
        }
        if value[..4] != V3_MARKER {
            return Err(Undecodable::WrongMarker);
        }
        let Some(kv) = value.get(4..6) else {
            return Err(Undecodable::Truncated("v3 key version missing"));
        };
        let key_version = u16::from_be_bytes([kv[0], kv[1]]);
        if key_version != 0 {
            return Err(Undecodable::Encrypted(key_version));
        }
        let mut m = decode_v2(&value[6..])?;
        m.msg = m.msg.start + 6..m.msg.end + 6;
        m.format = Format::V3;
        return Ok(m);
    }
    if value.starts_with(&V2_MARKER) {
        return decode_v2(value);
    }
    if value == [V3_MARKER[0]] || value == [V2_MARKER[0]] {
        return Err(Undecodable::Truncated("marker cut short"));
    }
    Err(Undecodable::NoEnvelope)
}

fn decode_v2(value: &[u8]) -> Result<Message, Undecodable> {
    if !value.starts_with(&V2_MARKER) {
        if value.is_empty() || value == [V2_MARKER[0]] {
            return Err(Undecodable::Truncated("v2 marker missing"));
        }
        return Err(Undecodable::NoEnvelope);
    }
    let Some(fingerprint) = value.get(2..10) else {
        return Err(Undecodable::Truncated("schema fingerprint cut short"));
    };
    if fingerprint != SCHEMA_FINGERPRINT {
        return Err(Undecodable::WrongFingerprint(hex_string(fingerprint)));
    }
    let mut pos = 10;
    let tstamp_us = read_long(value, &mut pos)?;
    let len = read_long(value, &mut pos)?;
    if len < 0 {
        return Err(Undecodable::Malformed("negative msg length"));
    }
    let remaining = value.len() - pos;
    // Compare before converting: a length claiming 2^62 bytes must not be trusted.
    if len as u64 > remaining as u64 {
        return Err(Undecodable::Truncated("msg shorter than its length"));
    }
    let end = pos + len as usize;
    if end != value.len() {
        return Err(Undecodable::Malformed("trailing bytes after the Avro record"));
    }
    Ok(Message { tstamp_us, msg: pos..end, format: Format::V2 })
}

/// Reads an Avro long: a zigzag-encoded base-128 varint of at most 10 bytes.
fn read_long(buf: &[u8], pos: &mut usize) -> Result<i64, Undecodable> {
    let mut raw: u64 = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return Err(Undecodable::Truncated("varint cut short"));
        };
        *pos += 1;
        if i == 9 && b > 1 {
            return Err(Undecodable::Malformed("varint longer than 64 bits"));
        }
        raw |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    Err(Undecodable::Malformed("varint longer than 10 bytes"))
}

/// Encodes a SINETStream message: v3 with key version 0 (the default since SINETStream 1.6), or
/// v2. The inverse of [`decode`]; used to re-create messages from an archive, and by tests.
pub fn encode(tstamp_us: i64, msg: &[u8], format: Format) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + 10 + 20 + msg.len());
    if format == Format::V3 {
        out.extend_from_slice(&V3_MARKER);
        out.extend_from_slice(&[0, 0]);
    }
    out.extend_from_slice(&V2_MARKER);
    out.extend_from_slice(&SCHEMA_FINGERPRINT);
    write_long(&mut out, tstamp_us);
    write_long(&mut out, msg.len() as i64);
    out.extend_from_slice(msg);
    out
}

/// Writes an Avro long: zigzag, then base-128 varint.
pub fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8 & 0x7F) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zigzag(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        write_long(&mut out, v);
        out
    }

    fn v2(tstamp: i64, msg: &[u8]) -> Vec<u8> {
        encode(tstamp, msg, Format::V2)
    }

    #[test]
    fn round_trips_extreme_timestamps() {
        for ts in [0, 1, -1, i64::MAX, i64::MIN, 1_650_250_000_123_456] {
            let value = v2(ts, b"x");
            let m = decode(&value).unwrap();
            assert_eq!(m.tstamp_us, ts);
            assert_eq!(&value[m.msg], b"x");
        }
    }

    #[test]
    fn v3_with_key_version_zero_wraps_v2() {
        let value = encode(7, b"hello", Format::V3);
        assert_eq!(value[..6], [0xDF, 0x03, 0, 0, 0, 0]);
        let m = decode(&value).unwrap();
        assert_eq!(m.format, Format::V3);
        assert_eq!(&value[m.msg], b"hello");
    }

    #[test]
    fn reasons_for_bad_values() {
        let mut enc = V3_MARKER.to_vec();
        enc.extend([0, 1, 9, 9]);
        assert_eq!(decode(&enc), Err(Undecodable::Encrypted(1)));
        assert_eq!(decode(b"{\"a\":1}"), Err(Undecodable::NoEnvelope));
        assert_eq!(decode(b""), Err(Undecodable::NoEnvelope));
        assert_eq!(decode(&[0xDF, 0x03, 0x01, 0x00, 0, 0]), Err(Undecodable::WrongMarker));
        assert!(matches!(decode(&[0xDF]), Err(Undecodable::Truncated(_))));
        assert!(matches!(decode(&[0xDF, 0x03, 0x00]), Err(Undecodable::Truncated(_))));
        let mut fp = v2(1, b"x");
        fp[3] ^= 0xFF;
        assert!(matches!(decode(&fp), Err(Undecodable::WrongFingerprint(_))));
        let full = v2(1, b"payload");
        for cut in 1..full.len() {
            assert!(matches!(decode(&full[..cut]), Err(Undecodable::Truncated(_))), "cut {cut}");
        }
        let mut trailing = full.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(Undecodable::Malformed(_))));
    }

    #[test]
    fn huge_length_claims_are_rejected_without_allocating() {
        let mut value = V2_MARKER.to_vec();
        value.extend_from_slice(&SCHEMA_FINGERPRINT);
        value.extend(zigzag(5));
        value.extend(zigzag(1 << 62));
        assert!(matches!(decode(&value), Err(Undecodable::Truncated(_))));
        let mut neg = V2_MARKER.to_vec();
        neg.extend_from_slice(&SCHEMA_FINGERPRINT);
        neg.extend(zigzag(5));
        neg.extend(zigzag(-3));
        assert_eq!(decode(&neg), Err(Undecodable::Malformed("negative msg length")));
        let mut long = V2_MARKER.to_vec();
        long.extend_from_slice(&SCHEMA_FINGERPRINT);
        long.extend([0xFF; 11]);
        assert!(matches!(decode(&long), Err(Undecodable::Malformed(_))));
    }
}
