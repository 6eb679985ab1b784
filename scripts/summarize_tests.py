#!/usr/bin/env python3
"""Counts GoogleTest results from JUnit XML files and prints one line per failed
or skipped test, an excerpt of the first failures' messages (a CI log may keep
only its tail), then the totals; the last line is `N passed, N failed`.

usage: summarize_tests.py [--skipped-fail] [--failure NAME]... XML_OR_DIR...
  --failure NAME   count a step that produced no XML (a build that failed) as failed
  --skipped-fail   count skipped tests as failed (make gpu-check: nothing may skip)
"""
import os
import sys
import xml.etree.ElementTree as ET


def xml_files(paths):
    for path in paths:
        if os.path.isdir(path):
            for root, _, files in os.walk(path, followlinks=True):
                for name in sorted(files):
                    if name.endswith(".xml"):
                        yield os.path.join(root, name)
        elif os.path.exists(path):
            yield path


def main(argv):
    failures, paths, skipped_fail = [], [], False
    it = iter(argv)
    for arg in it:
        if arg == "--failure":
            failures.append(next(it))
        elif arg == "--skipped-fail":
            skipped_fail = True
        else:
            paths.append(arg)
    passed, failed, skipped, excerpts = 0, [], [], []
    for path in xml_files(paths):
        try:
            tree = ET.parse(path)
        except ET.ParseError as error:
            failed.append(f"{path}: unreadable results ({error})")
            continue
        for case in tree.iter("testcase"):
            name = f"{case.get('classname')}.{case.get('name')}"
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                failed.append(f"{name} ({path})")
                excerpts.append((name, problem.get("message") or problem.text or ""))
            elif case.get("result") == "skipped" or case.find("skipped") is not None:
                skipped.append(name)
            else:
                passed += 1
    failed += failures
    if skipped_fail:
        failed += [f"{name} (skipped)" for name in skipped]
        skipped = []
    for name in skipped:
        print(f"SKIPPED {name}")
    for name, message in excerpts[:3]:
        lines = message.strip().splitlines()
        print(f"-- {name}: " + (f"{len(lines)} lines, the last 12" if len(lines) > 12 else "message"))
        for line in lines[-12:]:
            print("   " + (line if len(line) <= 240 else line[:240] + " ..."))
    for name in failed:
        print(f"FAILED  {name}")
    print(f"{len(skipped)} skipped (they need a GPU)" if skipped else "0 skipped")
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
