import CThinFSShims
import Foundation
import Logging
import PersistentData
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Puts a fresh filesystem on a thin device with the real mke2fs.
///
/// mke2fs writes into a sparse scratch file; only the extents it wrote
/// (found with SEEK_DATA/SEEK_HOLE) are copied into the thin device, and of
/// those only the pool blocks that are not all zeros: the device is empty, so
/// an unmapped block already reads as zeros. The options are Docker's
/// devicemapper ones (`-E nodiscard,lazy_itable_init=0,lazy_journal_init=0`),
/// so the inode tables and journal are written now rather than by a kernel
/// thread after mount.
public struct DeviceFormatter {
    public enum Filesystem: String, Sendable, CaseIterable {
        case ext4
    }

    public struct Result: Sendable, Equatable {
        public var uuid: String
        public var size: UInt64
        public var bytesWritten: UInt64
    }

    public static let dockerOptions = ["-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]

    let logger: Logger

    public init(logger: Logger = Logger(label: "thinfs.format")) { self.logger = logger }

    /// Formats device `id` of `pool` with a filesystem of `size` bytes.
    /// A device that already maps blocks is refused unless `force`, in which case it is discarded first.
    public func format(pool: any ThinPoolBackend, id: ThinDeviceID, size: UInt64, filesystem: Filesystem = .ext4,
                       extraArguments: [String] = [], force: Bool = false, scratchDirectory: String) throws -> Result {
        guard size >= 1 << 20, size % 4096 == 0 else {
            throw ThinPoolError.invalidConfiguration("filesystem size \(size) must be at least 1M and a multiple of 4K")
        }
        guard let details = try pool.deviceDetails()[id] else { throw ThinPoolError.message(.unknownDevice(id)) }
        let mapped = details.mappedBlocks
        if mapped > 0 && !force {
            throw ThinPoolError.invalidConfiguration("thin device \(id) already holds data (\(mapped) mapped blocks); use --force to format it anyway")
        }
        var arguments = extraArguments
        let uuid: String
        if let i = arguments.firstIndex(of: "-U"), i + 1 < arguments.count {
            uuid = arguments[i + 1]
        } else {
            uuid = UUID().uuidString.lowercased()
            arguments += ["-U", uuid]
        }

        try FileManager.default.createDirectory(atPath: scratchDirectory, withIntermediateDirectories: true)
        let scratch = scratchDirectory + "/mkfs-\(id)-\(UUID().uuidString).img"
        defer { unlink(scratch) }
        guard FileManager.default.createFile(atPath: scratch, contents: nil), truncate(scratch, off_t(size)) == 0 else {
            throw ThinPoolError.io(operation: "create", path: scratch, errno: Errno(rawValue: errno))
        }
        try runMkfs(filesystem: filesystem, arguments: Self.dockerOptions + arguments, image: scratch)

        let device = try pool.openDevice(id, size: size)
        defer { device.close() }
        if mapped > 0 { try device.discard(offset: 0, length: size) }
        let written = try copyWrittenExtents(from: scratch, to: device, blockSize: try pool.status().dataBlockSize, size: size)
        try device.flush()
        logger.info("formatted thin device", metadata: ["thin.id": "\(id)", "fs.uuid": "\(uuid)", "fs.bytes_written": "\(written)"])
        return Result(uuid: uuid, size: size, bytesWritten: written)
    }

    private func runMkfs(filesystem: Filesystem, arguments: [String], image: String) throws {
        // -q: mke2fs prints only errors, so the captured output is the reason for a failure.
        let result: (status: Int32, output: String)
        do {
            result = try E2fsprogs.run("/sbin/mke2fs", ["-t", filesystem.rawValue, "-F", "-q"] + arguments + [image])
        } catch {
            throw ThinPoolError.invalidConfiguration("\(error)")
        }
        guard result.status == 0 else {
            throw ThinPoolError.invalidConfiguration("mke2fs \(arguments.joined(separator: " ")) failed: \(result.output)")
        }
    }

    /// Copies the data extents of a sparse file, skipping all-zero pool blocks. Returns the bytes written.
    private func copyWrittenExtents(from path: String, to device: BlockDevice, blockSize: UInt64, size: UInt64) throws -> UInt64 {
        let fd = try FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec])
        defer { try? fd.close() }
        let chunk = Int(blockSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var written: UInt64 = 0
        var position: off_t = 0
        while UInt64(position) < size {
            let dataStart = thinfs_seek_data(fd.rawValue, Int64(position))
            if dataStart < 0 {
                if errno == ENXIO { break }   // no data after `position`
                throw ThinPoolError.io(operation: "lseek(SEEK_DATA)", path: path, errno: Errno(rawValue: errno))
            }
            var holeStart = thinfs_seek_hole(fd.rawValue, dataStart)
            if holeStart < 0 { holeStart = Int64(size) }
            // Copy whole pool blocks covering [dataStart, holeStart).
            var block = UInt64(dataStart) / blockSize * blockSize
            while block < UInt64(holeStart) {
                let n = Int(min(blockSize, size - block))
                let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                try fd.readFully(into: part, at: block, path: path)
                if !Self.isZero(UnsafeRawBufferPointer(part)) {
                    try device.write(UnsafeRawBufferPointer(part), at: block)
                    written += UInt64(n)
                }
                block += blockSize
            }
            position = off_t(block)
        }
        return written
    }

    static func isZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
        let words = buffer.count / 8
        let p = buffer.baseAddress!
        for i in 0..<words where p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        for i in (words * 8)..<buffer.count where buffer[i] != 0 { return false }
        return true
    }
}
