import PersistentData

/// crc32c over 4K blocks: every metadata block is checksummed when it is read
/// and when it is written, so this bounds how fast metadata can move.
extension BenchSuite {
    private static let section = "Checksum (crc32c over 4K blocks, as metadata blocks are sealed and validated)"

    func runChecksum() {
        step("crc32c: hardware, then software")
        let buffer = IOBuffer(count: 1 << 20, rng: &rng)
        let hardware = Self.crcSeconds(buffer, bytes: config.crcHardwareBytes) { CRC32C.update($0, $1) }
        let software = Self.crcSeconds(buffer, bytes: config.crcSoftwareBytes) { CRC32C.updateSoftware($0, $1) }
        let hw = Self.mibPerSecond(UInt64(config.crcHardwareBytes), hardware)
        let sw = Self.mibPerSecond(UInt64(config.crcSoftwareBytes), software)
        record(Self.section, "crc32c", "crc32c, CRC32C.update vs updateSoftware", unit: .mibPerSecond, thinfs: hw, baseline: sw,
               baselineName: "CRC32C.updateSoftware (slicing-by-8)",
               note: CRC32C.isHardwareAccelerated ? "SSE4.2 crc32 instruction in use" : "no SSE4.2: both columns are software")
    }

    /// Checksums `bytes` of the buffer, 4K at a time; returns seconds.
    private static func crcSeconds(_ buffer: IOBuffer, bytes: Int,
                                   _ crc: (UInt32, UnsafeRawBufferPointer) -> UInt32) -> Double {
        // The checksum functions are C, opaque to the optimizer, so no call is dropped.
        return Stopwatch.seconds {
            var done = 0
            while done < bytes {
                for offset in stride(from: 0, to: buffer.bytes.count, by: ioSize) {
                    _ = crc(0xffff_ffff, UnsafeRawBufferPointer(rebasing: buffer.readOnly[offset..<offset + ioSize]))
                }
                done += buffer.bytes.count
            }
        }
    }
}
