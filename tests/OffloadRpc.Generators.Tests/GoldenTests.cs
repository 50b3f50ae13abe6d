using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.Emit;
using Xunit;

namespace OffloadRpc.Generators.Tests;

/// <summary>The generated text of representative contracts, pinned by checked-in golden files, and proof that it compiles cleanly.</summary>
public sealed class GoldenTests
{
    public static TheoryData<string> Cases => new(TestInputs.GoldenCases.Keys);

    [Theory]
    [MemberData(nameof(Cases))]
    public void GeneratedSourcesMatchGoldenFiles(string caseName)
    {
        GeneratorRun run = GeneratorHarness.Run(TestInputs.GoldenCases[caseName]);

        Assert.Empty(run.DriverDiagnostics);
        Assert.Null(run.Result.Exception);
        Golden.Verify(caseName, run.Sources);
    }

    [Theory]
    [InlineData("DesignExample", "Sample.Imaging.IImageService")]
    [InlineData("KitchenSink", "Sample.Sink.IKitchenSink")]
    [InlineData("GlobalNamespace", "IGlobalCalculator")]
    public void EveryServiceGetsAProxyAStubAndARegistration(string caseName, string prefix)
    {
        GeneratorRun run = GeneratorHarness.Run(TestInputs.GoldenCases[caseName]);

        Assert.Equal(
            [prefix + ".Proxy.g.cs", prefix + ".Registration.g.cs", prefix + ".Stub.g.cs"],
            run.Sources.Keys.Order(StringComparer.Ordinal));
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void InputAndGeneratedCodeCompileWithoutWarnings(string caseName)
    {
        GeneratorRun run = GeneratorHarness.Run(TestInputs.GoldenCases[caseName]);

        Assert.Empty(run.DriverDiagnostics);
        Assert.Equal(run.Input.SyntaxTrees.Count() + 3, run.Output.SyntaxTrees.Count());
        Assert.Equal(ReportDiagnostic.Error, run.Output.Options.GeneralDiagnosticOption);
        Assert.Equal(NullableContextOptions.Enable, run.Output.Options.NullableContextOptions);

        Diagnostic[] problems = run.Output.GetDiagnostics().Where(d => d.Severity >= DiagnosticSeverity.Warning).ToArray();
        Assert.True(problems.Length == 0, "The output compilation has diagnostics:" + Environment.NewLine + GeneratorHarness.Format(problems));

        using var image = new MemoryStream();
        EmitResult emit = run.Output.Emit(image);
        Diagnostic[] emitProblems = emit.Diagnostics.Where(d => d.Severity >= DiagnosticSeverity.Warning).ToArray();
        Assert.True(emit.Success && emitProblems.Length == 0, "Emit failed:" + Environment.NewLine + GeneratorHarness.Format(emitProblems));
    }

    /// <summary>With documentation diagnostics on, the generated doc comments (crefs to the interface, inheritdoc) are valid.</summary>
    [Theory]
    [MemberData(nameof(Cases))]
    public void GeneratedDocumentationCommentsAreValid(string caseName)
    {
        CSharpParseOptions diagnose = GeneratorHarness.ParseOptions.WithDocumentationMode(DocumentationMode.Diagnose);
        GeneratorRun run = GeneratorHarness.Run(GeneratorHarness.CreateCompilation(diagnose, TestInputs.GoldenCases[caseName]));

        var generated = run.Output.SyntaxTrees.Except(run.Input.SyntaxTrees).ToHashSet();
        Assert.Equal(3, generated.Count);
        Assert.All(generated, tree => Assert.Equal(DocumentationMode.Diagnose, tree.Options.DocumentationMode));

        // Only what documentation mode adds, and only in generated trees: the input's public members have
        // no doc comments (CS1591 there is expected), and other problems are InputAndGeneratedCodeCompileWithoutWarnings's.
        GeneratorRun parseOnly = GeneratorHarness.Run(TestInputs.GoldenCases[caseName]);
        var withoutDocs = parseOnly.Output.GetDiagnostics().Select(d => (d.Id, d.Location.GetLineSpan())).ToHashSet();
        Diagnostic[] problems = run.Output.GetDiagnostics()
            .Where(d => d.Severity >= DiagnosticSeverity.Warning && d.Location.SourceTree is { } tree && generated.Contains(tree))
            .Where(d => !withoutDocs.Contains((d.Id, d.Location.GetLineSpan())))
            .ToArray();
        Assert.True(problems.Length == 0, "The generated sources have diagnostics:" + Environment.NewLine + GeneratorHarness.Format(problems));
    }
}
