// CSQLite: only includes. Exactly one Swift file imports this module (Layers/LayerDatabase.swift).
#pragma once
#include <sqlite3.h>
