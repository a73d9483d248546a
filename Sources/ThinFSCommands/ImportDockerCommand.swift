import ArgumentParser
import Foundation
import ThinFS

/// `thinfs import-docker`: Docker's devicemapper devices as read-only layers of a new store.
struct ImportDockerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import-docker",
        abstract: "Import the images and containers of Docker's devicemapper driver (removed in Docker 25) as read-only layers.",
        discussion: """
            DOCKERDM is Docker's devicemapper directory (such as /var/lib/docker/devicemapper). Its \
            metadata/ files name the thin devices; the pool is DOCKERDM/devicemapper/{data,metadata} \
            (loop-lvm), read by the userspace engine, or the kernel pool --thinpool names (direct-lvm). \
            Nothing there is written. Layers are named by chain id and container id when Docker's layer \
            database (DOCKERDM/../image/devicemapper/layerdb) is there, else by device hash. The new store \
            at --root is read-only: list, mount (read-only) and diff its layers; create, rm and apply-diff \
            are refused.
            """)
    @OptionGroup var options: RootOptions
    @Argument(help: "Docker's devicemapper directory, such as /var/lib/docker/devicemapper.") var dockerDM: String
    @Option(name: .customLong("thinpool"), help: "A kernel thin pool (dm name, as dm.thinpooldev) instead of the loop-lvm files.")
    var thinPool: String?
    @Flag(name: .customLong("no-layerdb"), help: "Name layers by device hash even where Docker's layer database names them.")
    var noLayerDB = false
    @Flag(name: .customLong("dry-run"), help: "Check everything and print what would be imported; create no store.")
    var dryRun = false

    func run() throws {
        _ = options.poolRoot
        let report = try DockerImport.run(deviceSetRoot: dockerDM, root: options.root, thinPool: thinPool,
                                          useLayerDB: !noLayerDB, dryRun: dryRun)
        defer { try? report.store?.close() }
        print(Self.describe(report, dockerDM: dockerDM, root: options.root), terminator: "")
    }

    static func describe(_ report: DockerImport.Report, dockerDM: String, root: String) -> String {
        let plan = report.plan
        var out = if let store = report.store {
            "imported \(plan.layers.count) layers from \(dockerDM) into \(store.root), read-only\n"
        } else {
            "would import \(plan.layers.count) layers from \(dockerDM) (dry run; nothing created)\n"
        }
        out += "pool: \(plan.source), transaction id \(plan.poolTransactionID)\n"
        out += "base: thin device \(plan.base.deviceID), \(ByteSize.human(plan.base.size)) \(plan.base.filesystem), UUID \(plan.base.uuid)\n"
        out += "names: \(plan.layerDB.map { "Docker's layer database \($0)" } ?? "device hashes")\n"
        let width = plan.layers.map(\.id.count).max() ?? 0
        for layer in plan.layers {
            let id = layer.id.padding(toLength: width, withPad: " ", startingAt: 0)
            out += "  \(id)  device \(layer.deviceID)  \(layer.kind.rawValue)  \(ByteSize.human(layer.size))  parent \(layer.parent ?? "<base>")\n"
        }
        if !plan.skipped.isEmpty {
            out += "skipped \(plan.skipped.count) device\(plan.skipped.count == 1 ? "" : "s"):\n"
            for s in plan.skipped { out += "  \(s.hash) (thin device \(s.deviceID), \(s.file)): \(s.reason)\n" }
        }
        for note in plan.notes { out += "note: \(note)\n" }
        return out
    }
}
