using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp.Testing;
using Microsoft.CodeAnalysis.Diagnostics;
using Microsoft.CodeAnalysis.Testing;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>
/// Runs an analyzer over test code with the markup of Microsoft.CodeAnalysis.Testing. References are
/// taken offline: the installed .NET reference pack, the OffloadRpc runtime and MessagePack.
/// </summary>
internal static class AnalyzerVerifier<TAnalyzer>
    where TAnalyzer : DiagnosticAnalyzer, new()
{
    private static readonly Lazy<MetadataReference[]> s_references = new(LoadReferences);

    public static async Task VerifyAsync(string source, string? editorConfig = null)
    {
        var test = new CSharpAnalyzerTest<TAnalyzer, DefaultVerifier>
        {
            TestCode = source,
            ReferenceAssemblies = new ReferenceAssemblies("net10.0"),
        };
        test.TestState.AdditionalReferences.AddRange(s_references.Value);
        if (editorConfig is not null)
        {
            test.TestState.AnalyzerConfigFiles.Add(("/.editorconfig", "root = true\n\n[*]\n" + editorConfig));
        }

        await test.RunAsync();
    }

    /// <summary>Verifies the diagnostics of <paramref name="source"/>, that <typeparamref name="TFix"/> turns it into <paramref name="fixedSource"/>, one by one and all at once (Fix All).</summary>
    public static async Task VerifyFixAsync<TFix>(string source, string fixedSource)
        where TFix : Microsoft.CodeAnalysis.CodeFixes.CodeFixProvider, new()
    {
        var test = new CSharpCodeFixTest<TAnalyzer, TFix, DefaultVerifier>
        {
            TestCode = source,
            FixedCode = fixedSource,
            ReferenceAssemblies = new ReferenceAssemblies("net10.0"),
        };
        test.TestState.AdditionalReferences.AddRange(s_references.Value);
        test.FixedState.AdditionalReferences.AddRange(s_references.Value);
        await test.RunAsync();
    }

    internal static MetadataReference[] References => s_references.Value;

    private static MetadataReference[] LoadReferences()
    {
        // <dotnet root>/shared/Microsoft.NETCore.App/<version>/ -> <dotnet root>/packs/Microsoft.NETCore.App.Ref/<version>/ref/net10.0/
        string runtime = Path.GetDirectoryName(typeof(object).Assembly.Location)!;
        string root = Path.GetFullPath(Path.Combine(runtime, "..", "..", ".."));
        string packs = Path.Combine(root, "packs", "Microsoft.NETCore.App.Ref");
        string version = Directory.GetDirectories(packs).Select(Path.GetFileName).OrderByDescending(v => Version.TryParse(v!.Split('-')[0], out Version? parsed) ? parsed : new Version()).First()!;
        string refs = Path.Combine(packs, version, "ref", "net10.0");
        return Directory.GetFiles(refs, "*.dll")
            .Append(typeof(OffloadServiceAttribute).Assembly.Location)
            .Append(typeof(MessagePack.MessagePackSerializer).Assembly.Location)
            .Append(typeof(MessagePack.MessagePackObjectAttribute).Assembly.Location)
            .Select(path => (MetadataReference)MetadataReference.CreateFromFile(path))
            .ToArray();
    }
}
