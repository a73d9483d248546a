import TestSupport
import Testing
@testable import PersistentData

@Suite struct CRC32CTests {
    /// The CRC-32C check value from the catalogue of parametrised CRCs (and RFC 3720's iSCSI CRC).
    @Test func standardCheckValue() {
        print("CRC32C hardware acceleration (SSE4.2) in use: \(CRC32C.isHardwareAccelerated)")
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
    }

    /// The hardware path (three interleaved streams folded in GF(2), then
    /// 8-byte and byte tails) must equal the table-driven one for every length
    /// and alignment, including the short tails and the block-sized fast path.
    @Test(arguments: Array(0..<20) + [
        31, 64, 4079,   // around the 3-stream threshold (3 * 1360 = 4080)
        4080, 4081,
        4092,           // a metadata block after its checksum field
        4096,           // a whole block
        8161, 12345,    // several stripes of three plus a ragged tail
    ])
    func hardwareMatchesSoftware(length: Int) {
        var rng = SeededRandom(seed: UInt64(length) &* 0x9E37_79B9)
        // A few unaligned start offsets, since the 8-byte loads use memcpy.
        let buffer = (0..<(length + 8)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        for offset in [0, 1, 3, 7] {
            for seed: UInt32 in [0, 0xffff_ffff, 0x1234_5678] {
                buffer.withUnsafeBytes { all in
                    let slice = UnsafeRawBufferPointer(rebasing: all[offset..<(offset + length)])
                    let hw = CRC32C.update(seed, slice)
                    let sw = CRC32C.updateSoftware(seed, slice)
                    #expect(hw == sw, "length \(length) offset \(offset) seed \(seed)")
                }
            }
        }
    }

    /// A block checksum computed in two pieces equals the one-shot value: the
    /// update is a running CRC without final inversion, as the kernel's crc32c().
    @Test func updatesChain() {
        var rng = SeededRandom(seed: 42)
        let bytes = (0..<4096).map { _ in UInt8.random(in: 0...255, using: &rng) }
        bytes.withUnsafeBytes { p in
            let whole = CRC32C.update(0xffff_ffff, p)
            let first = CRC32C.update(0xffff_ffff, UnsafeRawBufferPointer(rebasing: p[0..<1000]))
            #expect(CRC32C.update(first, UnsafeRawBufferPointer(rebasing: p[1000...])) == whole)
        }
    }
}
