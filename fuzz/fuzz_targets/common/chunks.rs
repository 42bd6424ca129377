//! Cutting a fuzz input into the reads a socket could deliver.

/// Splits `input` as `[count, sizes[..count], stream...]`: `count` (1 to 16)
/// chunk sizes of 1 to 256 bytes each, used in turn over and over, cut the
/// stream into chunks. Returns the stream and its chunks.
pub fn split(input: &[u8]) -> (&[u8], Vec<&[u8]>) {
    let Some((&count, rest)) = input.split_first() else {
        return (input, Vec::new());
    };
    let count = usize::from(count % 16) + 1;
    let (sizes, stream) = rest.split_at(count.min(rest.len()));
    let sizes: Vec<usize> = if sizes.is_empty() { vec![1] } else { sizes.iter().map(|&b| usize::from(b) + 1).collect() };
    let mut chunks = Vec::new();
    let mut offset = 0;
    for size in sizes.iter().cycle() {
        if offset == stream.len() {
            break;
        }
        let end = (offset + size).min(stream.len());
        chunks.push(&stream[offset..end]);
        offset = end;
    }
    (stream, chunks)
}
