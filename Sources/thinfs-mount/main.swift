import ThinFSCommands

ThinFSMountCommand.main()
