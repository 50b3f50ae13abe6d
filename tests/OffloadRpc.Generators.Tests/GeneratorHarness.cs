using System.Collections.Immutable;
using System.Reflection;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;

namespace OffloadRpc.Generators.Tests;

/// <summary>The result of one run of <see cref="ServiceGenerator"/> over a compilation.</summary>
internal sealed record GeneratorRun(
    CSharpCompilation Input,
    GeneratorDriver Driver,
    Compilation Output,
    ImmutableArray<Diagnostic> DriverDiagnostics)
{
    public GeneratorDriverRunResult RunResult => Driver.GetRunResult();

    public GeneratorRunResult Result => RunResult.Results.Single();

    /// <summary>Generated sources by hint name, with line endings normalized to \n.</summary>
    public IReadOnlyDictionary<string, string> Sources =>
        Result.GeneratedSources.ToDictionary(s => s.HintName, s => GeneratorHarness.NormalizeNewLines(s.SourceText.ToString()), StringComparer.Ordinal);
}

/// <summary>Builds compilations from source text and runs the generator over them with step tracking on.</summary>
internal static class GeneratorHarness
{
    public static readonly CSharpParseOptions ParseOptions = new(LanguageVersion.Latest, DocumentationMode.Parse);

    /// <summary>
    /// Nullable on, every warning (all warning waves) an error: the bar the TestContracts project holds
    /// generated code to. LanguageVersion.Latest is the newest the pinned Roslyn (4.8, the generator's
    /// minimum host) knows: C# 12.
    /// </summary>
    public static readonly CSharpCompilationOptions CompilationOptions = new CSharpCompilationOptions(
            OutputKind.DynamicallyLinkedLibrary,
            nullableContextOptions: NullableContextOptions.Enable,
            generalDiagnosticOption: ReportDiagnostic.Error,
            warningLevel: 9999,
            deterministic: true)
        // Like the SDK (NoWarn 1701;1702): MessagePack's net6.0 references unify with the net10.0 framework facades.
        .WithSpecificDiagnosticOptions([new("CS1701", ReportDiagnostic.Suppress), new("CS1702", ReportDiagnostic.Suppress)]);

    private static readonly Lazy<ImmutableArray<MetadataReference>> s_references = new(LoadReferences);

    public static ImmutableArray<MetadataReference> References => s_references.Value;

    public static CSharpCompilation CreateCompilation(params string[] sources) =>
        CreateCompilation(ParseOptions, sources);

    public static CSharpCompilation CreateCompilation(CSharpParseOptions parseOptions, params string[] sources) =>
        CSharpCompilation.Create(
            "GeneratorTestInput",
            sources.Select((source, i) => Parse(source, $"Input{i}.cs", parseOptions)),
            References,
            CompilationOptions);

    public static SyntaxTree Parse(string source, string path, CSharpParseOptions? parseOptions = null) =>
        CSharpSyntaxTree.ParseText(source, parseOptions ?? ParseOptions, path);

    public static GeneratorDriver CreateDriver(CSharpParseOptions? parseOptions = null) =>
        CSharpGeneratorDriver.Create(
            [new ServiceGenerator().AsSourceGenerator()],
            additionalTexts: null,
            parseOptions: parseOptions ?? ParseOptions,
            optionsProvider: null,
            driverOptions: new GeneratorDriverOptions(IncrementalGeneratorOutputKind.None, trackIncrementalGeneratorSteps: true));

    public static GeneratorRun Run(CSharpCompilation compilation, GeneratorDriver? driver = null)
    {
        driver ??= CreateDriver((CSharpParseOptions)compilation.SyntaxTrees.First().Options);
        driver = driver.RunGeneratorsAndUpdateCompilation(compilation, out Compilation output, out ImmutableArray<Diagnostic> diagnostics);
        return new GeneratorRun(compilation, driver, output, diagnostics);
    }

    public static GeneratorRun Run(params string[] sources) => Run(CreateCompilation(sources));

    public static string NormalizeNewLines(string text) => text.Replace("\r\n", "\n", StringComparison.Ordinal).Replace('\r', '\n');

    public static string Format(IEnumerable<Diagnostic> diagnostics) =>
        string.Join(Environment.NewLine, diagnostics.Select(d => d.ToString()));

    /// <summary>
    /// Every assembly the test process has loaded from disk, after loading the runtime, MessagePack
    /// and everything they reference (facades like System.Memory included), so that the generated
    /// code binds exactly as in a real project.
    /// </summary>
    private static ImmutableArray<MetadataReference> LoadReferences()
    {
        var pending = new Stack<Assembly>([typeof(OffloadServiceAttribute).Assembly, typeof(MessagePack.MessagePackSerializer).Assembly]);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        while (pending.Count > 0)
        {
            Assembly assembly = pending.Pop();
            if (!seen.Add(assembly.FullName!))
            {
                continue;
            }

            foreach (AssemblyName name in assembly.GetReferencedAssemblies())
            {
                try
                {
                    pending.Push(Assembly.Load(name));
                }
                catch (FileNotFoundException)
                {
                    // an optional dependency that is not deployed; the compilation does not need it
                }
            }
        }

        return AppDomain.CurrentDomain.GetAssemblies()
            .Where(a => !a.IsDynamic && !string.IsNullOrEmpty(a.Location))
            .Select(a => a.Location)
            .Distinct(StringComparer.Ordinal)
            .OrderBy(location => location, StringComparer.Ordinal)
            .Select(location => (MetadataReference)MetadataReference.CreateFromFile(location))
            .ToImmutableArray();
    }
}
