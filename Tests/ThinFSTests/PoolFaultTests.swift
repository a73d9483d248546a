import Foundation
import PersistentData
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// I/O errors from the pool's own files: a `PoolIOHook` makes the data file or the metadata file
/// fail reads, writes or flushes with EIO, or write short, until the fault is cleared. The writer
/// must get EIO; the pool goes read-only with needs_check where its metadata can no longer be
/// trusted (the kernel's metadata_operation_failed) and stays read-write where only one I/O
/// failed; what was committed before the fault reads back intact after a reopen, and thin_check
/// passes.
@Suite("Pool I/O faults", .enabled(if: Oracle.available, "thin-provisioning-tools are not installed"))
struct PoolFaultTests {
    /// Fails every matching operation while armed.
    final class Fault: PoolIOHook, @unchecked Sendable {
        enum Kind: String, Sendable { case read, write, sync }
        let file: PoolIOOperation.File
        let kind: Kind
        /// nil: EIO; otherwise a write lands only this many bytes, then fails.
        let short: Int?
        private let lock = Lock()
        private var armed = false
        private(set) var fired = 0

        init(_ file: PoolIOOperation.File, _ kind: Kind, short: Int? = nil) {
            self.file = file
            self.kind = kind
            self.short = short
        }

        func arm(_ on: Bool) { lock.withLock { armed = on } }

        func willPerform(_ operation: PoolIOOperation) throws(Errno) -> Int? {
            let matches = switch (operation, kind) {
            case (.read, .read), (.write, .write), (.zero, .write), (.durableWrite, .write), (.sync, .sync): operation.file == file
            default: false
            }
            guard matches, lock.withLock({ armed }) else { return nil }
            lock.withLock { fired += 1 }
            if let short { return short }
            throw .ioError
        }

        func didPerform(_ operation: PoolIOOperation) {}
    }

    struct Case: CustomTestStringConvertible, Sendable {
        var file: PoolIOOperation.File
        var kind: Fault.Kind
        var short: Int?
        /// The pool turns read-only with needs_check.
        var readOnly: Bool
        /// needs_check reaches the disk: not when the metadata file refuses the superblock too.
        /// A superblock written short still carries it: its checksum and flags lead the block.
        var flagOnDisk: Bool { readOnly && !(file == .metadata && kind == .write && short == nil) }
        var testDescription: String { "\(file.rawValue) \(kind.rawValue)\(short.map { " short (\($0) bytes)" } ?? " EIO")" }
    }

    static let cases: [Case] = [
        // A failed data write fails that write only, as a failed bio does in the kernel; the
        // mapping is not changed, so the block keeps its old content.
        Case(file: .data, kind: .write, readOnly: false),
        Case(file: .data, kind: .write, short: 1000, readOnly: false),
        // A failed copy-on-write read fails the write.
        Case(file: .data, kind: .read, readOnly: false),
        // A failed data flush: the kernel may have dropped the dirty pages it could not write and
        // would report the next flush clean (fsync's error is reported once), so committing the
        // mappings later would publish blocks whose data is lost. The transaction is abandoned.
        Case(file: .data, kind: .sync, readOnly: true),
        // Metadata that cannot be written or flushed: the transaction rolls back, needs_check.
        Case(file: .metadata, kind: .write, readOnly: true),
        Case(file: .metadata, kind: .write, short: 100, readOnly: true),
        Case(file: .metadata, kind: .sync, readOnly: true),
    ]

    static let bs: UInt64 = 64 << 10

    static func pattern(_ byte: UInt8, blocks: Int) -> [UInt8] {
        (0..<blocks * Int(bs)).map { UInt8(truncatingIfNeeded: $0 / 4096) ^ byte }
    }

    static func read(_ pool: UserspaceThinPool, block: UInt64, blocks: Int) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: blocks * Int(bs))
        try buffer.withUnsafeMutableBytes { try pool.read(1, into: $0, at: block * bs) }
        return buffer
    }

    @Test(arguments: cases)
    func ioErrorReachesTheWriterAndCommittedDataSurvives(_ c: Case) throws {
        try check(c)
    }

    func check(_ c: Case) throws {
        let dir = TempDir()
        let dataPath = dir.path + "/data", metaPath = dir.path + "/metadata"
        let fault = Fault(c.file, c.kind, short: c.short)
        PoolIOHooks.install(fault, dataPath: dataPath)
        defer { PoolIOHooks.remove(dataPath: dataPath) }
        let a = Self.pattern(0xa5, blocks: 4), b = Self.pattern(0x3c, blocks: 4)
        do {
            let pool = try UserspaceThinPool.create(dataPath: dataPath, metadataPath: metaPath, dataSize: 64 * Self.bs,
                                                    metadataSize: 4 << 20, blockSize: Self.bs, logger: quietLogger)
            try pool.message(.createThin(1))
            // Acknowledged: blocks 0-3 hold A once this commit returns.
            try a.withUnsafeBytes { try pool.write(1, $0, at: 0) }
            try pool.commit()

            fault.arm(true)
            // B over blocks 2-5, half of it partial (a copy-on-write reads the old block first).
            let error = #expect(throws: ThinPoolError.self) {
                try b.withUnsafeBytes { try pool.write(1, UnsafeRawBufferPointer(rebasing: $0[100...]), at: 2 * Self.bs + 100) }
                try pool.commit()
            }
            #expect(fault.fired > 0)
            #expect(error?.errno == .ioError, "\(String(describing: error))")
            let status = try pool.status()
            #expect(status.needsCheck == c.readOnly && (status.mode == .ro) == c.readOnly, "\(status.line)")
            if c.readOnly {
                let refused = #expect(throws: ThinPoolError.self) { try a.withUnsafeBytes { try pool.write(1, $0, at: 0) } }
                #expect(refused?.errno == .readOnlyFileSystem, "\(String(describing: refused))")
                #expect(throws: ThinPoolError.self) { try pool.commit() }
            }
            // What the last commit holds still reads, while the fault lasts (reads of a faulty
            // data file aside).
            if c.kind != .read || c.file != .data { #expect(try Self.read(pool, block: 0, blocks: 4) == a) }
            fault.arm(false)
            if !c.readOnly {
                // One failed I/O does not stop the pool: it writes and commits again.
                try a.withUnsafeBytes { try pool.write(1, $0, at: 8 * Self.bs) }
                try pool.commit()
            }
            try pool.close()
        }
        PoolIOHooks.remove(dataPath: dataPath)
        let check = try Oracle.run("thin_check", [metaPath])
        #expect(check.status == 0, "thin_check after the fault: \(check.stdout)\(check.stderr)")
        let pool = try UserspaceThinPool.open(dataPath: dataPath, metadataPath: metaPath, readOnly: true, logger: quietLogger)
        defer { try? pool.close() }
        #expect(try pool.status().needsCheck == c.flagOnDisk)
        #expect(try Self.read(pool, block: 0, blocks: 4) == a, "the committed blocks changed")
        #expect(try Self.read(pool, block: 4, blocks: 2) == [UInt8](repeating: 0, count: 2 * Int(Self.bs)),
                "the failed write left mappings behind")
        if !c.readOnly { #expect(try Self.read(pool, block: 8, blocks: 4) == a) }
    }
}
