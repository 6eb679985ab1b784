"""A precompiled header for Bazel 4.2, which has none of its own.

`precompiled_header(name, includes, deps)` writes NAME.h (one #include per entry of
`includes`) and compiles it into NAME.h.gch with the very command line of the
build's C++ compiles (the toolchain's flags, --copt and --cxxopt, -fPIC), so that
GCC accepts it. A target that depends on it and has
`copts = ["-include", "<package>/NAME.h"]` has that header processed first: GCC
finds NAME.h beside the .gch in the output tree and loads the .gch instead of
parsing the headers again. Where the flags differ (a target's own -D that the
headers test), GCC ignores the .gch and parses NAME.h: slower, never wrong.
"""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")
load("@bazel_tools//tools/build_defs/cc:action_names.bzl", "CPP_COMPILE_ACTION_NAME")

def _precompiled_header_impl(ctx):
    cc_toolchain = find_cpp_toolchain(ctx)
    features = cc_common.configure_features(
        ctx = ctx,
        cc_toolchain = cc_toolchain,
        requested_features = ctx.features,
        unsupported_features = ctx.disabled_features,
    )
    header = ctx.actions.declare_file(ctx.attr.name + ".h")
    ctx.actions.write(header, "".join(["#include <%s>\n" % h for h in ctx.attr.includes]))
    gch = ctx.actions.declare_file(ctx.attr.name + ".h.gch")
    deps = cc_common.merge_cc_infos(cc_infos = [d[CcInfo] for d in ctx.attr.deps])
    compilation = deps.compilation_context
    variables = cc_common.create_compile_variables(
        feature_configuration = features,
        cc_toolchain = cc_toolchain,
        user_compile_flags = ctx.fragments.cpp.copts + ctx.fragments.cpp.cxxopts,
        source_file = header.path,
        output_file = gch.path,
        include_directories = compilation.includes,
        quote_include_directories = compilation.quote_includes,
        system_include_directories = compilation.system_includes,
        preprocessor_defines = compilation.defines,
        use_pic = True,
    )
    ctx.actions.run(
        executable = cc_common.get_tool_for_action(
            feature_configuration = features,
            action_name = CPP_COMPILE_ACTION_NAME,
        ),
        arguments = ["-x", "c++-header"] + cc_common.get_memory_inefficient_command_line(
            feature_configuration = features,
            action_name = CPP_COMPILE_ACTION_NAME,
            variables = variables,
        ),
        env = cc_common.get_environment_variables(
            feature_configuration = features,
            action_name = CPP_COMPILE_ACTION_NAME,
            variables = variables,
        ),
        inputs = depset([header], transitive = [compilation.headers, cc_toolchain.all_files]),
        outputs = [gch],
        mnemonic = "CppPrecompiledHeader",
        progress_message = "Precompiling %s" % ", ".join(ctx.attr.includes),
    )
    own = CcInfo(compilation_context = cc_common.create_compilation_context(
        headers = depset([header, gch]),
    ))
    return [
        DefaultInfo(files = depset([header, gch])),
        cc_common.merge_cc_infos(cc_infos = [own, deps]),
    ]

precompiled_header = rule(
    implementation = _precompiled_header_impl,
    attrs = {
        "includes": attr.string_list(mandatory = True, doc = "headers, as in #include <...>"),
        "deps": attr.label_list(providers = [CcInfo], doc = "where those headers come from"),
        "_cc_toolchain": attr.label(default = Label("@bazel_tools//tools/cpp:current_cc_toolchain")),
    },
    fragments = ["cpp"],
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    incompatible_use_toolchain_transition = True,
)
