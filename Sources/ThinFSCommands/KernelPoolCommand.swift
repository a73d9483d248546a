import ArgumentParser
import Foundation
import PersistentData
import ThinFS

/// `thinfs kernel-pool`: a kernel dm-thin pool through libdevmapper (no dmsetup).
/// Small on purpose: what the layer store will do through `KernelThinPool`, by hand,
/// for the VM tests and for people inspecting a pool.
struct KernelPoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernel-pool",
        abstract: "Drive a kernel dm-thin pool (an LVM thin pool or a loop-file pool) through libdevmapper.",
        subcommands: [CreateLoop.self, Remove.self, Message.self, Status.self, Activate.self, Deactivate.self,
                      CancelDeferredRemove.self, Info.self, DevStatus.self, List.self, Resize.self]
    )

    struct PoolOptions: ParsableArguments {
        @Option(help: "The pool's dm name or /dev/mapper path (as in dm.thinpooldev).") var pool: String
        @Option(help: "Thin device name prefix (default: the pool name).") var prefix: String?
        @Flag(name: .shortAndLong, help: "Log at debug level to stderr.") var verbose = false

        func open() throws -> KernelThinPool {
            Logging.bootstrapOnce(verbose: verbose)
            return try KernelThinPool(poolName: pool, devicePrefix: prefix)
        }
    }

    struct CreateLoop: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create-loop",
            abstract: "Create (or reopen) a pool on sparse data and metadata files over loop devices, like Docker's loop-lvm.")
        @Option(help: "The pool's dm name.") var name: String
        @Option(help: "Data file (created sparse if missing).") var data: String
        @Option(help: "Metadata file (created sparse if missing).") var metadata: String
        @Option(name: .customLong("data-size"), help: "Data size (default 100G).") var dataSize = Size(bytes: 100 << 30)
        @Option(name: .customLong("metadata-size"), help: "Metadata size (default 2G).") var metadataSize = Size(bytes: 2 << 30)
        @Option(name: .customLong("block-size"), help: "Pool block size (default 64K).") var blockSize = Size(bytes: 64 << 10)
        @Flag(name: .customLong("error-if-no-space"), help: "Fail writes at once when the pool is full instead of queueing them.") var errorIfNoSpace = false

        func run() throws {
            Logging.bootstrapOnce(verbose: false)
            var config = LoopThinPool.Configuration(dataFile: data, metadataFile: metadata, dataSize: dataSize.bytes,
                                                    metadataSize: metadataSize.bytes, blockSize: blockSize.bytes)
            if errorIfNoSpace { config.features.append("error_if_no_space") }
            let pool = try LoopThinPool.create(name: name, config)
            print("\(pool.poolPath): \(try pool.poolTable().line)")
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove the pool device (its loop devices unbind with it).")
        @Option(help: "The pool's dm name.") var name: String
        func run() throws {
            Logging.bootstrapOnce(verbose: false)
            try LoopThinPool.remove(name: name)
        }
    }

    struct Message: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "message", abstract: "Send a pool message; create_snap suspends an active origin around it.")
        @OptionGroup var options: PoolOptions
        @Argument(help: "create_thin <id> | create_snap <id> <origin> | delete <id> | set_transaction_id <cur> <new> | reserve_metadata_snap | release_metadata_snap")
        var message: [String]
        func run() throws { try options.open().message(PoolMessage(parsing: message.joined(separator: " "))) }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Print the pool's status line, parsed and printed back in the kernel's format.")
        @OptionGroup var options: PoolOptions
        @Flag(help: "One field per line.") var fields = false
        func run() throws {
            let s = try options.open().status()
            guard fields else { return print(s.line) }
            print("""
            mode: \(s.mode.rawValue)
            transaction_id: \(s.transactionID)
            metadata: \(s.usedMetadataBlocks)/\(s.totalMetadataBlocks)
            data: \(s.usedDataBlocks)/\(s.totalDataBlocks)
            data_block_size: \(s.dataBlockSize)
            held_root: \(s.heldMetadataRoot.map(String.init) ?? "-")
            discard: \(s.discard)
            no_space: \(s.errorIfNoSpace ? "error" : "queue")
            needs_check: \(s.needsCheck)
            metadata_low_watermark: \(s.metadataLowWatermark)
            """)
        }
    }

    struct Activate: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "activate", abstract: "Activate thin device ID as /dev/mapper/PREFIX-ID (or resize its table).")
        @OptionGroup var options: PoolOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        @Option(help: "Virtual size (default 10G).") var size = Size(bytes: 10 << 30)
        func run() throws {
            let pool = try options.open()
            try pool.activate(id.id, size: size.bytes)
            print(pool.devicePath(id.id))
        }
    }

    struct Deactivate: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "deactivate", abstract: "Remove thin device ID's dm device (EBUSY retried); --deferred removes it when its last user closes it.")
        @OptionGroup var options: PoolOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        @Flag(help: "Deferred remove.") var deferred = false
        func run() throws { try options.open().deactivate(id.id, deferred: deferred) }
    }

    struct CancelDeferredRemove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "cancel-deferred-remove", abstract: "Cancel a pending deferred remove of thin device ID.")
        @OptionGroup var options: PoolOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        func run() throws { try options.open().cancelDeferredRemove(id.id) }
    }

    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "info", abstract: "Thin device ID's dm state: active, open count, suspended, deferred remove.")
        @OptionGroup var options: PoolOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        func run() throws {
            let pool = try options.open()
            guard let i = try pool.info(id.id) else { return print("\(pool.deviceName(id.id)): not active") }
            print("\(pool.deviceName(id.id)): active open_count=\(i.openCount) suspended=\(i.suspended) deferred_remove=\(i.deferredRemove) dev=\(i.major):\(i.minor)")
        }
    }

    struct DevStatus: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "dev-status", abstract: "Thin device ID's status: <mapped sectors> <highest mapped sector>.")
        @OptionGroup var options: PoolOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        func run() throws { print(try options.open().deviceStatus(id.id).line) }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "The pool's thin device ids, read from a metadata snapshot.")
        @OptionGroup var options: PoolOptions
        func run() throws { for id in try options.open().deviceIDs() { print(id) } }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "resize", abstract: "Grow the pool's data: a loop pool's file (--data-file), or the table after lvextend.")
        @OptionGroup var options: PoolOptions
        @Option(name: .customLong("data-size"), help: "New data size.") var dataSize: Size
        @Option(name: .customLong("data-file"), help: "The loop pool's data file, grown first.") var dataFile: String?
        func run() throws {
            let pool = try options.open()
            if let dataFile { try LoopThinPool.resize(pool, dataFile: dataFile, to: dataSize.bytes) } else { try pool.resize(dataBytes: dataSize.bytes) }
            print(try pool.status().line)
        }
    }
}
