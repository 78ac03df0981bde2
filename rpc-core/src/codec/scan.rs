//! The non-recursive scanner that every untrusted byte string goes through before serde sees it: one pass,
//! rejecting truncated input, the reserved marker, containers longer than the input and nesting past the limit.

use super::CodecError;

/// The counts of values still to read per open level, kept on the stack for the nesting the default limit allows
/// (every value checked would otherwise cost an allocation).
pub(super) struct Pending {
    inline: [u64; 72],
    len: usize,
    spilled: Vec<u64>,
}

impl Pending {
    /// One value to read at the top level.
    fn new() -> Pending {
        let mut inline = [0; 72];
        inline[0] = 1;
        Pending { inline, len: 1, spilled: Vec::new() }
    }

    fn len(&self) -> usize {
        self.len + self.spilled.len()
    }

    fn last_mut(&mut self) -> Option<&mut u64> {
        match self.spilled.last_mut() {
            Some(last) => Some(last),
            None => self.len.checked_sub(1).map(|top| &mut self.inline[top]),
        }
    }

    fn push(&mut self, items: u64) {
        if self.spilled.is_empty() && self.len < self.inline.len() {
            self.inline[self.len] = items;
            self.len += 1;
        } else {
            self.spilled.push(items);
        }
    }

    fn pop(&mut self) {
        if self.spilled.pop().is_none() {
            self.len = self.len.saturating_sub(1);
        }
    }
}

pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
    pub(super) last_was_container: bool,
}

impl Reader<'_> {
    /// Skips exactly one value, nested `depth` levels deep already, rejecting nesting deeper than `max_depth`.
    pub(super) fn skip_one(&mut self, max_depth: usize, depth: usize) -> Result<(), CodecError> {
        // Values still to read at each open level; the bottom entry is the one value.
        let mut pending = Pending::new();
        while let Some(last) = pending.last_mut() {
            if *last == 0 {
                pending.pop();
                continue;
            }
            *last -= 1;
            let items = self.skip_value()?;
            let levels = pending.len() + depth;
            if items > 0 {
                if levels > max_depth {
                    return Err(CodecError::TooDeep { max: max_depth });
                }
                if items > self.remaining() as u64 {
                    return Err(CodecError::Malformed("container longer than the input"));
                }
                pending.push(items);
            } else if items == 0 && self.last_was_container && levels > max_depth {
                return Err(CodecError::TooDeep { max: max_depth });
            }
        }
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

    /// Skips one value's header and payload; returns how many nested values follow (array items, map keys
    /// and values), 0 for scalars.
    pub(super) fn skip_value(&mut self) -> Result<u64, CodecError> {
        self.last_was_container = false;
        let marker = self.take(1)?[0];
        let (skip, items) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc1 => return Err(CodecError::Malformed("reserved marker 0xc1")),
            0xc4 | 0xd9 => (self.uint(1)?, 0),
            0xc5 | 0xda => (self.uint(2)?, 0),
            0xc6 | 0xdb => (self.uint(4)?, 0),
            0xc7 => (self.uint(1)? + 1, 0),
            0xc8 => (self.uint(2)? + 1, 0),
            0xc9 => (self.uint(4)? + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.uint(2)?),
            0xdd => (0, self.uint(4)?),
            0xde => (0, 2 * self.uint(2)?),
            0xdf => (0, 2 * self.uint(4)?),
        };
        self.last_was_container = matches!(marker, 0x80..=0x9f | 0xdc..=0xdf);
        let skip = usize::try_from(skip).map_err(|_| CodecError::Malformed("length does not fit in memory"))?;
        self.take(skip)?;
        Ok(items)
    }
}
