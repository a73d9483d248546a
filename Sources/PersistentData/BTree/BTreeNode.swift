#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A btree node is one metadata block (dm-btree-internal.h):
///
///     offset  size
///          0     4  csum          crc32c(block[4..<4096]) ^ 121107
///          4     4  flags         1 = internal node, 2 = leaf
///          8     8  blocknr       this block's own number
///         16     4  nr_entries
///         20     4  max_entries   a multiple of 3 (the kernel requires it)
///         24     4  value_size    8 in internal nodes (child block numbers)
///         28     4  padding
///         32        keys[max_entries]      little-endian u64, strictly increasing
///         32 + 8*max_entries                values[max_entries], value_size bytes each
///
/// In an internal node, key[i] is a lower bound of every key under child i.
/// Every node but the root holds at least max_entries / 3 entries.
public enum BTreeNode {
    public static let headerSize = 32
    public static let internalFlag: UInt32 = 1
    public static let leafFlag: UInt32 = 2

    /// The kernel's `calc_max_entries`: as many (key, value) pairs as fit, rounded down to a multiple of 3.
    public static func maxEntries(valueSize: Int) -> Int {
        let total = (MetadataBlock.size - headerSize) / (8 + valueSize)
        return 3 * (total / 3)
    }

    @inline(__always) static func isLeaf(_ n: MetadataBlock) -> Bool { n.u32(4) & leafFlag != 0 }
    @inline(__always) static func count(_ n: MetadataBlock) -> Int { Int(n.u32(16)) }
    @inline(__always) static func setCount(_ n: MetadataBlock, _ c: Int) { n.setU32(16, UInt32(c)) }
    @inline(__always) static func maxEntries(_ n: MetadataBlock) -> Int { Int(n.u32(20)) }
    @inline(__always) static func valueSize(_ n: MetadataBlock) -> Int { Int(n.u32(24)) }
    @inline(__always) static func key(_ n: MetadataBlock, _ i: Int) -> UInt64 { n.u64(headerSize + 8 * i) }
    @inline(__always) static func setKey(_ n: MetadataBlock, _ i: Int, _ k: UInt64) { n.setU64(headerSize + 8 * i, k) }
    @inline(__always) static func valueOffset(_ n: MetadataBlock, _ i: Int) -> Int {
        headerSize + 8 * maxEntries(n) + valueSize(n) * i
    }
    @inline(__always) static func child(_ n: MetadataBlock, _ i: Int) -> UInt64 { n.u64(valueOffset(n, i)) }
    @inline(__always) static func setChild(_ n: MetadataBlock, _ i: Int, _ c: UInt64) { n.setU64(valueOffset(n, i), c) }

    static func initialize(_ n: MetadataBlock, leaf: Bool, valueSize: Int) {
        n.zero()
        n.setU32(4, leaf ? leafFlag : internalFlag)
        n.setU64(8, n.location)
        n.setU32(16, 0)
        n.setU32(20, UInt32(maxEntries(valueSize: valueSize)))
        n.setU32(24, UInt32(valueSize))
    }

    /// Checks a node beyond its checksum, so that no later access strays out of the
    /// block and no search is misled: the header, and (when `keyOrder`) that the keys
    /// strictly increase. Errors name the node and the tree.
    static func validate(_ n: MetadataBlock, leafValueSize: Int, tree: String, keyOrder: Bool = true) throws(MetadataError) {
        func bad(_ reason: String) -> MetadataError { .inconsistent(block: n.location, tree: tree, reason: reason) }
        let flags = n.u32(4)
        let leaf: Bool
        switch flags {
        case internalFlag: leaf = false
        case leafFlag: leaf = true
        default: throw bad("btree node flags \(flags) are neither internal (1) nor leaf (2)")
        }
        let vs = valueSize(n)
        let expected = leaf ? leafValueSize : 8
        guard vs == expected else {
            throw bad("btree \(leaf ? "leaf" : "internal node") value size is \(vs), expected \(expected)")
        }
        let max = maxEntries(n)
        guard max == maxEntries(valueSize: vs) else {
            throw bad("btree node max_entries is \(max), expected \(maxEntries(valueSize: vs))")
        }
        let c = count(n)
        guard c <= max else { throw bad("btree node has \(c) entries, more than its max of \(max)") }
        // An internal node always has a child to descend to; an empty one would send
        // a search to child -1.
        guard leaf || c > 0 else { throw bad("btree internal node has no entries") }
        if keyOrder && c > 1 {
            var previous = key(n, 0)
            for i in 1..<c {
                let k = key(n, i)
                guard k > previous else { throw bad("btree keys out of order: key \(i) is \(k), after \(previous)") }
                previous = k
            }
        }
    }

    /// Index of the largest key <= `key`, or -1 (the kernel's `lower_bound`).
    @inline(__always) static func lowerBound(_ n: MetadataBlock, _ key: UInt64) -> Int {
        var lo = -1
        var hi = count(n)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2
            if self.key(n, mid) <= key { lo = mid } else { hi = mid }
        }
        return lo
    }

    /// Opens a gap at `i` by moving entries [i, count) up one slot.
    static func openGap(_ n: MetadataBlock, at i: Int) {
        let c = count(n)
        let vs = valueSize(n)
        if i < c {
            let kp = n.bytes + headerSize + 8 * i
            _ = memmove((kp + 8), kp, 8 * (c - i))
            let vp = n.bytes + valueOffset(n, i)
            _ = memmove((vp + vs), vp, vs * (c - i))
        }
        setCount(n, c + 1)
    }

    /// Removes entry `i`, moving the later entries down.
    static func removeEntry(_ n: MetadataBlock, at i: Int) {
        let c = count(n)
        let vs = valueSize(n)
        if i + 1 < c {
            let kp = n.bytes + headerSize + 8 * i
            _ = memmove(kp, kp + 8, 8 * (c - i - 1))
            let vp = n.bytes + valueOffset(n, i)
            _ = memmove(vp, vp + vs, vs * (c - i - 1))
        }
        setCount(n, c - 1)
    }

    /// Copies `length` entries from `src[from...]` to `dst[to...]` (the ranges must be valid and not overlap).
    static func copyEntries(from src: MetadataBlock, _ from: Int, to dst: MetadataBlock, _ to: Int, length: Int) {
        guard length > 0 else { return }
        let vs = valueSize(src)
        _ = memmove((dst.bytes + headerSize + 8 * to), src.bytes + headerSize + 8 * from, 8 * length)
        (dst.bytes + valueOffset(dst, to)).copyMemory(from: src.bytes + valueOffset(src, from), byteCount: vs * length)
    }

    /// Moves entries [at, count) of `n` up by `by` slots (room for `by` entries at the front).
    static func shiftUp(_ n: MetadataBlock, by: Int) {
        let c = count(n)
        let vs = valueSize(n)
        let kp = n.bytes + headerSize
        _ = memmove((kp + 8 * by), kp, 8 * c)
        let vp = n.bytes + valueOffset(n, 0)
        _ = memmove((vp + vs * by), vp, vs * c)
    }

    /// Moves entries down by `by` slots, dropping the first `by`.
    static func shiftDown(_ n: MetadataBlock, by: Int) {
        let c = count(n)
        let vs = valueSize(n)
        let kp = n.bytes + headerSize
        _ = memmove(kp, kp + 8 * by, 8 * (c - by))
        let vp = n.bytes + valueOffset(n, 0)
        _ = memmove(vp, vp + vs * by, vs * (c - by))
    }
}
