//! [`Text`]: the envelope's strings, shared rather than copied.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use bytestring::ByteString;

/// An immutable UTF-8 string that is cheap to clone: a static string, a string moved in, or a slice of the
/// message it was read from.
///
/// The envelope's names (service, method, reply address, idempotency key, caller) are `Text`, so that a call
/// does not copy them on their way: a generated client's service and method names are static, an inbox's
/// address is shared by every call of its client, and a decoded envelope's strings point into the received
/// bytes. It reads as a `str` (`Deref`), compares equal to one, and hashes like one.
///
/// ```
/// use rpc_core::Text;
///
/// let name = Text::from_static("Calculator");
/// let owned = Text::from(String::from("Calculator"));
/// assert_eq!(name, owned);
/// assert_eq!(name, "Calculator");
/// assert!(name.starts_with("Calc"));
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text(ByteString);

impl Text {
    /// The empty string.
    pub const fn new() -> Text {
        Text(ByteString::new())
    }

    /// A static string, without copying it.
    pub const fn from_static(text: &'static str) -> Text {
        Text(ByteString::from_static(text))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `bytes`, kept rather than copied, if they are UTF-8: a slice of a received frame stays a slice of it.
    ///
    /// # Errors
    /// Bytes that are not UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Text, std::str::Utf8Error> {
        ByteString::try_from(bytes).map(Text)
    }

    /// A copy of `text` whose clones share it without allocating: a short one (up to 128 bytes, such as a reply
    /// subject) is cut from a chunk that this thread's small copies share, a longer one copied on its own.
    /// `Text::from(&str)` copies into an allocation of its own, whose first clone allocates again (the shared
    /// header of bytes made from a vector).
    ///
    /// ```
    /// use rpc_core::Text;
    ///
    /// let subject = Text::copied("_INBOX.abc.mqrpc.1");
    /// let clone = subject.clone();
    /// assert_eq!(clone.as_ptr(), subject.as_ptr());
    /// assert_eq!(subject, "_INBOX.abc.mqrpc.1");
    /// ```
    pub fn copied(text: &str) -> Text {
        // Cut from a `str`, the bytes are UTF-8: the fallback is never taken.
        Text::from_utf8(crate::codec::cut_small(text.as_bytes())).unwrap_or_else(|_| Text::from(text))
    }

    /// The string's bytes, shared rather than copied.
    pub fn into_bytes(self) -> Bytes {
        self.0.into_bytes()
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl From<String> for Text {
    fn from(text: String) -> Text {
        Text(ByteString::from(text))
    }
}

impl From<&str> for Text {
    /// A copy of `text`; [`Text::from_static`] does not copy a static string.
    fn from(text: &str) -> Text {
        Text(ByteString::from(text))
    }
}

impl From<&String> for Text {
    fn from(text: &String) -> Text {
        Text::from(text.as_str())
    }
}

impl From<Cow<'static, str>> for Text {
    /// Static strings are not copied.
    fn from(text: Cow<'static, str>) -> Text {
        match text {
            Cow::Borrowed(text) => Text::from_static(text),
            Cow::Owned(text) => Text::from(text),
        }
    }
}

impl From<Text> for String {
    fn from(text: Text) -> String {
        text.as_str().to_owned()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        String::deserialize(deserializer).map(Text::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_a_slice_reads_as_the_bytes_it_points_into() {
        let frame = Bytes::from_static(b"..service..\xff\xfe");
        let text = Text::from_utf8(frame.slice(2..9)).expect("utf-8");
        assert_eq!(text, "service");
        assert_eq!(text.as_ptr(), frame[2..].as_ptr(), "a slice, not a copy");
        assert!(Text::from_utf8(frame.slice(11..13)).is_err());
    }

    #[test]
    fn it_hashes_and_orders_as_its_string() {
        use std::collections::{BTreeSet, HashSet};
        let set: HashSet<Text> = [Text::from_static("a"), Text::from(String::from("b"))].into();
        assert!(set.contains("a") && set.contains("b"));
        let ordered: BTreeSet<Text> = [Text::from("b"), Text::from("a")].into();
        assert_eq!(ordered.iter().map(Text::as_str).collect::<Vec<_>>(), ["a", "b"]);
    }
}
