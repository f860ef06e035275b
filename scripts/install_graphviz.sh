#!/usr/bin/env bash
# Make graphviz's `dot` binary available (the graphviz Python package only calls it).
# Installs it with apt-get where we can (root on Debian/Ubuntu); otherwise says what to do.
# Never fails the set-up: without `dot` the scripts skip their cell plots with a warning.
set -u
if command -v dot >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "Installing graphviz with apt-get (for the cell plots)..."
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; then
        exit 0
    fi
    echo "WARNING: apt-get install graphviz failed."
fi
echo "WARNING: graphviz's \`dot\` is not installed, so cell plots will be skipped and the plotting"
echo "         tests will be skipped. Install it with your system's package manager:"
echo "         sudo apt-get install graphviz   (Debian/Ubuntu)"
echo "         brew install graphviz           (macOS)"
echo "         conda install -c conda-forge graphviz"
exit 0
