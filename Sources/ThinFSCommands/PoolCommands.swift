import ArgumentParser
import Foundation
import PersistentData
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

struct PoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool",
        abstract: "Create, inspect and change the thin pool.",
        subcommands: [Create.self, Open.self, Message.self, Status.self, Dump.self, Restore.self, Check.self, Resize.self]
    )

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a pool: sparse data and metadata files with fresh dm-thin metadata.")
        @OptionGroup var options: RootOptions
        @Option(help: "Data file or block device (default: ROOT/pool/data).") var data: String?
        @Option(help: "Metadata file or block device (default: ROOT/pool/metadata).") var metadata: String?
        @Option(name: .customLong("data-size"), help: "Data size (Docker's loop-lvm default: 100G).") var dataSize = Size(bytes: 100 << 30)
        @Option(name: .customLong("metadata-size"), help: "Metadata size (default 2G).") var metadataSize = Size(bytes: 2 << 30)
        @Option(name: .customLong("block-size"), help: "Pool block size, 64K to 1G in multiples of 64K (default 64K).") var blockSize = Size(bytes: 64 << 10)
        @Flag(name: .customLong("no-block-zeroing"), help: "Do not zero the rest of a new block on a partial write (dm-thin's skip_block_zeroing).") var noBlockZeroing = false
        @Flag(name: .customLong("no-atomic-commit"), help: "Overwrite committed exclusive blocks in place, as the kernel does (faster; not crash-atomic).") var noAtomicCommit = false

        func run() throws {
            let pool = try options.poolRoot.create(
                data: data, metadata: metadata, dataSize: dataSize.bytes, metadataSize: metadataSize.bytes, blockSize: blockSize.bytes,
                options: .init(blockZeroing: !noBlockZeroing, atomicCommit: !noAtomicCommit))
            print("created pool: data \(pool.dataPath), metadata \(pool.metadataPath), block size \(ByteSize.format(pool.blockSize))")
        }
    }

    struct Open: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "open", abstract: "Adopt an existing pool (kernel-made, thin_restore-made) without changing it.")
        @OptionGroup var options: RootOptions
        @Option(help: "Data file or block device.") var data: String
        @Option(help: "Metadata file or block device.") var metadata: String
        @Flag(name: .customLong("no-block-zeroing")) var noBlockZeroing = false
        @Flag(name: .customLong("no-atomic-commit")) var noAtomicCommit = false

        func run() throws {
            let pool = try options.poolRoot.adopt(data: data, metadata: metadata,
                                                  options: .init(blockZeroing: !noBlockZeroing, atomicCommit: !noAtomicCommit))
            print("adopted pool: \(try pool.status().line)")
        }
    }

    struct Message: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "message", abstract: "Send a dm-thin pool message, e.g. 'create_thin 1' or 'create_snap 2 1'.")
        @OptionGroup var options: RootOptions
        @Argument(help: "create_thin <id> | create_snap <id> <origin> | delete <id> | set_transaction_id <cur> <new> | reserve_metadata_snap | release_metadata_snap")
        var message: [String]

        func run() throws {
            let text = message.joined(separator: " ")
            let parsed = try PoolMessage(parsing: text)
            let root = options.poolRoot
            try root.open().message(parsed)
            // A snapshot carries its origin's filesystem; a deleted device carries none.
            switch parsed {
            case .createSnap(let id, let origin):
                if let fs = try root.filesystems()[origin] { try root.record(filesystem: fs, for: id) }
            case .delete(let id):
                if try root.filesystems()[id] != nil { try root.record(filesystem: nil, for: id) }
            default:
                break
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Print the pool status line in the kernel's format.")
        @OptionGroup var options: RootOptions
        @Flag(help: "Print it the way 'docker info' prints its storage section.") var human = false

        func run() throws {
            let root = options.poolRoot
            let report: PoolStatusReport
            if let live = try Self.fromDaemon(root: root.path, human: human) {
                report = live
            } else {
                report = try PoolStatusReport.of(try root.open(readOnly: true), human: human)
            }
            FileHandle.standardOutput.write(Data(report.output.utf8))
            if let warning = report.warning { FileHandle.standardError.write(Data("thinfs: \(warning)\n".utf8)) }
        }

        /// The status of the daemon that holds `root`'s store, if one does: its pool as it is
        /// now, which may differ from the disk's (PoolStatusReport). A daemon that is starting or
        /// stopping (EAGAIN) is asked again for a few seconds; nil when none answers.
        static func fromDaemon(root: String, human: Bool) throws -> PoolStatusReport? {
            let request = LayerRequest(.poolStatus, human: human)
            guard let response = try StoreAccess.askDaemon(root: root, request, until: Date().addingTimeInterval(15)) else {
                return nil
            }
            if let error = response.error { throw CommandFailure(message: error) }
            do {
                return try JSONDecoder().decode(PoolStatusReport.self, from: Data(response.output.utf8))
            } catch {
                throw CommandFailure(message: "the daemon of the store at \(root) answered pool-status with no status: \(response.output.prefix(200))")
            }
        }
    }

    struct Dump: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "dump", abstract: "Print the metadata as XML, element for element what thin_dump prints.")
        @OptionGroup var options: RootOptions
        @Flag(name: .customLong("metadata-snap"), help: "Dump the held metadata snapshot instead.") var metadataSnap = false

        func run() throws {
            let pool = try options.poolRoot.open(readOnly: true)
            try pool.withMetadata { md in
                try md.dumpXML(metadataSnapshot: metadataSnap) { FileHandle.standardOutput.write(Data($0.utf8)) }
            }
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "restore", abstract: "Write fresh metadata from thin_dump XML, as thin_restore does.")
        @OptionGroup var options: RootOptions
        @Argument(help: "The XML file.") var file: String
        @Flag(help: "Overwrite metadata that already holds thin devices.") var force = false

        func run() throws {
            let root = options.poolRoot
            let config = try root.config()
            guard let xml = FileManager.default.contents(atPath: file) else {
                throw ThinPoolError.invalidConfiguration("cannot read \(file)")
            }
            if !force, let existing = try? ThinMetadata.open(storage: FileMetadataStorage(path: config.metadata, readOnly: true)),
               !existing.deviceIDs.isEmpty {
                throw ThinPoolError.invalidConfiguration("\(config.metadata) holds \(existing.deviceIDs.count) thin device(s); restoring would replace them. Use --force.")
            }
            // Parse and build in memory first, so bad XML changes nothing on disk.
            let scratch = MemoryMetadataStorage(nrBlocks: try FileMetadataStorage(path: config.metadata, readOnly: true).nrBlocks)
            let parsed = try ThinMetadata.restore(xml: xml, storage: scratch)
            let needed = parsed.nrDataBlocks * UInt64(parsed.dataBlockSize) * 512
            let dataSize = (try? FileManager.default.attributesOfItem(atPath: config.data)[.size] as? UInt64) ?? 0
            guard dataSize >= needed else {
                throw ThinPoolError.invalidConfiguration("\(file) describes \(needed) bytes of data, but \(config.data) has \(dataSize); grow it first")
            }
            let md = try ThinMetadata.restore(xml: xml, storage: FileMetadataStorage(path: config.metadata))
            print("restored \(md.deviceIDs.count) thin device(s) into \(config.metadata)")
        }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "check", abstract: "Check the metadata: trees, reference counts, space maps (thin_check must agree).")
        @OptionGroup var options: RootOptions

        func run() throws {
            let config = try options.poolRoot.config()
            let report = try ThinMetadata.check(storage: FileMetadataStorage(path: config.metadata, readOnly: true))
            print(report)
            guard report.isClean else { throw ExitCode(1) }
        }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "resize", abstract: "Grow the data device online. Shrinking is refused.")
        @OptionGroup var options: RootOptions
        @Option(name: .customLong("data-size"), help: "The new data size.") var dataSize: Size

        func run() throws {
            let pool = try options.poolRoot.open()
            try pool.resize(dataBytes: dataSize.bytes)
            print(try pool.status().line)
        }
    }
}
