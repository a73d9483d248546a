import ThinFSCommands

// As mount.fuse.thinfs, mount(8)'s helper form is translated first.
do {
    ThinFSMountCommand.main(try ThinFSMountCommand.arguments(for: CommandLine.arguments))
} catch {
    ThinFSMountCommand.exit(withError: error)
}
