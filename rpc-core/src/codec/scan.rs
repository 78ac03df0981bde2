//! The non-recursive scanner that every untrusted byte string goes through before serde sees it: one pass,
//! rejecting truncated input, the reserved marker, containers longer than the input and nesting past the limit.

use super::CodecError;

/// The levels around the one being read that still have values to read, innermost last: for each, the count
/// of its values still to read and its depth. On the stack for the first 16 (an envelope nests 2 deep, and
/// every value checked would otherwise cost an allocation), past them on the heap, up to the depth limit. A
/// container that is the last value of its level leaves nothing to come back to, and adds none: arguments, an
/// array of values, add none at all.
struct Outer {
    inline: [(u64, usize); 16],
    len: usize,
    spilled: Vec<(u64, usize)>,
}

impl Outer {
    fn new() -> Outer {
        Outer { inline: [(0, 0); 16], len: 0, spilled: Vec::new() }
    }

    fn push(&mut self, level: (u64, usize)) {
        if self.len < self.inline.len() {
            self.inline[self.len] = level;
            self.len += 1;
        } else {
            self.spilled.push(level);
        }
    }

    fn pop(&mut self) -> Option<(u64, usize)> {
        if let Some(level) = self.spilled.pop() {
            return Some(level);
        }
        self.len = self.len.checked_sub(1)?;
        Some(self.inline[self.len])
    }
}

pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl Reader<'_> {
    /// Skips exactly one value, nested `depth` levels deep already, rejecting nesting deeper than `max_depth`.
    ///
    /// One loop over the values, whatever their nesting: a scalar is skipped where it is read, and a container
    /// opens a level whose count of values replaces the current one.
    pub(super) fn skip_one(&mut self, max_depth: usize, depth: usize) -> Result<(), CodecError> {
        // Values still to read at the current level, and its depth; the outermost level is the one value.
        let mut left: u64 = 1;
        let mut level = depth;
        // Made at the first level that has values after a container.
        let mut outer: Option<Outer> = None;
        loop {
            if left == 0 {
                match outer.as_mut().and_then(Outer::pop) {
                    Some(around) => {
                        (left, level) = around;
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            left -= 1;
            let marker = *self.bytes.get(self.pos).ok_or(CodecError::Malformed("truncated input"))?;
            self.pos += 1;
            let items = match marker {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => continue,
                0xa0..=0xbf => {
                    self.skip(u64::from(marker & 0x1f))?;
                    continue;
                }
                0x80..=0x8f => 2 * u64::from(marker & 0x0f),
                0x90..=0x9f => u64::from(marker & 0x0f),
                0xdc => self.uint(2)?,
                0xdd => self.uint(4)?,
                0xde => 2 * self.uint(2)?,
                0xdf => 2 * self.uint(4)?,
                0xc1 => return Err(CodecError::Malformed("reserved marker 0xc1")),
                0xc4 | 0xd9 => {
                    let len = self.uint(1)?;
                    self.skip(len)?;
                    continue;
                }
                0xc5 | 0xda => {
                    let len = self.uint(2)?;
                    self.skip(len)?;
                    continue;
                }
                0xc6 | 0xdb => {
                    let len = self.uint(4)?;
                    self.skip(len)?;
                    continue;
                }
                0xc7 => {
                    let len = self.uint(1)? + 1;
                    self.skip(len)?;
                    continue;
                }
                0xc8 => {
                    let len = self.uint(2)? + 1;
                    self.skip(len)?;
                    continue;
                }
                0xc9 => {
                    let len = self.uint(4)? + 1;
                    self.skip(len)?;
                    continue;
                }
                0xca..=0xd8 => {
                    self.skip(fixed_len(marker))?;
                    continue;
                }
            };
            // A container, at the level after the current one.
            if level + 1 > max_depth {
                return Err(CodecError::TooDeep { max: max_depth });
            }
            if items > 0 {
                if items > self.remaining() as u64 {
                    return Err(CodecError::Malformed("container longer than the input"));
                }
                if left > 0 {
                    outer.get_or_insert_with(Outer::new).push((left, level));
                }
                (left, level) = (items, level + 1);
            }
        }
    }

    /// Skips `len` bytes.
    fn skip(&mut self, len: u64) -> Result<(), CodecError> {
        let len = usize::try_from(len).map_err(|_| CodecError::Malformed("length does not fit in memory"))?;
        if len > self.remaining() {
            return Err(CodecError::Malformed("truncated input"));
        }
        self.pos += len;
        Ok(())
    }

    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&[u8], CodecError> {
        if n > self.remaining() {
            return Err(CodecError::Malformed("truncated input"));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    pub(super) fn uint(&mut self, width: usize) -> Result<u64, CodecError> {
        Ok(self.take(width)?.iter().fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte)))
    }
}

/// The bytes after the marker of a scalar of fixed size: a number, a float, or a fixed-size extension.
fn fixed_len(marker: u8) -> u64 {
    match marker {
        0xcc | 0xd0 => 1,
        0xcd | 0xd1 | 0xd4 => 2,
        0xd5 => 3,
        0xca | 0xce | 0xd2 => 4,
        0xd6 => 5,
        0xcb | 0xcf | 0xd3 => 8,
        0xd7 => 9,
        _ => 17,
    }
}
