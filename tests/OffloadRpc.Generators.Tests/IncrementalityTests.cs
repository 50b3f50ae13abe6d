using System.Collections;
using System.Collections.Immutable;
using System.Reflection;
using System.Runtime.CompilerServices;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using OffloadRpc.Generators.Models;
using Xunit;

namespace OffloadRpc.Generators.Tests;

/// <summary>
/// The pipeline caches: edits that do not touch a service's contract do not re-emit it (after the
/// dotnet/runtime LibraryImportGenerator and Refit incrementality tests).
/// </summary>
public sealed class IncrementalityTests
{
    private const string ServicePath = "Calculator.cs";
    private const string UnrelatedPath = "Helper.cs";

    private const string Service = """
        using System.Threading;
        using System.Threading.Tasks;
        using OffloadRpc;

        namespace Inc;

        [OffloadService]
        public interface ICalculator
        {
            Task<int> AddAsync(int a, int b, CancellationToken ct = default);

            ValueTask ResetAsync();
        }
        """;

    private const string Unrelated = """
        namespace Inc;

        public static class Helper
        {
            public static int Twice(int x) => x * 2;
        }
        """;

    private static readonly IncrementalStepRunReason[] s_cachedOrUnchanged = [IncrementalStepRunReason.Cached, IncrementalStepRunReason.Unchanged];

    [Fact]
    public void FirstRunProducesNewOutputs()
    {
        (_, GeneratorDriver driver) = RunOnce();

        GeneratorRunResult result = driver.GetRunResult().Results.Single();
        Assert.All(Outputs(result, ServiceGenerator.TrackingNames.Services), o => Assert.Equal(IncrementalStepRunReason.New, o.Reason));
        Assert.All(Outputs(result, ServiceGenerator.TrackingNames.ValidServices), o => Assert.Equal(IncrementalStepRunReason.New, o.Reason));
        Assert.Equal(3, result.GeneratedSources.Length);
    }

    [Fact]
    public void RerunWithTheSameCompilationIsCached()
    {
        (CSharpCompilation compilation, GeneratorDriver driver) = RunOnce();

        GeneratorRunResult result = driver.RunGenerators(compilation).GetRunResult().Results.Single();

        AssertModelsAndSourcesCached(result);
    }

    [Fact]
    public void AddingAnUnrelatedSyntaxTreeDoesNotReemit()
    {
        (CSharpCompilation compilation, GeneratorDriver driver) = RunOnce();

        CSharpCompilation edited = compilation.AddSyntaxTrees(
            GeneratorHarness.Parse("namespace Inc; public sealed class Extra { public int Value { get; set; } }", "Extra.cs"));
        GeneratorRunResult result = driver.RunGenerators(edited).GetRunResult().Results.Single();

        AssertModelsAndSourcesCached(result);
    }

    [Fact]
    public void EditingAnUnrelatedMethodBodyDoesNotReemit()
    {
        (CSharpCompilation compilation, GeneratorDriver driver) = RunOnce();

        CSharpCompilation edited = Replace(compilation, UnrelatedPath, Unrelated.Replace("x * 2", "x + x", StringComparison.Ordinal));
        GeneratorRunResult result = driver.RunGenerators(edited).GetRunResult().Results.Single();

        AssertModelsAndSourcesCached(result);
    }

    /// <summary>ForAttributeWithMetadataName re-runs the transform for the edited file, but the model compares equal.</summary>
    [Fact]
    public void CommentAndWhitespaceInTheServiceFileDoNotReemit()
    {
        (CSharpCompilation compilation, GeneratorDriver driver) = RunOnce();

        string edited = Service
            .Replace("    ValueTask ResetAsync();", "    // Resets the accumulator.\n\n\n    ValueTask   ResetAsync( );", StringComparison.Ordinal)
            .Replace("public interface ICalculator", "/// <summary>A calculator.</summary>\npublic interface ICalculator", StringComparison.Ordinal);
        Assert.NotEqual(Service, edited);
        GeneratorRunResult result = driver.RunGenerators(Replace(compilation, ServicePath, edited)).GetRunResult().Results.Single();

        // The transform ran again for the edited file (so the step is not merely cached) and produced an equal model.
        Assert.Contains(Outputs(result, ServiceGenerator.TrackingNames.Services), o => o.Reason == IncrementalStepRunReason.Unchanged);
        AssertModelsAndSourcesCached(result);
    }

    [Fact]
    public void ChangingAParameterTypeModifiesTheModelAndReemits()
    {
        (CSharpCompilation compilation, GeneratorDriver driver) = RunOnce();
        string before = Source(driver, "Inc.ICalculator.Proxy.g.cs");

        CSharpCompilation edited = Replace(compilation, ServicePath, Service.Replace("AddAsync(int a, int b", "AddAsync(long a, int b", StringComparison.Ordinal));
        driver = driver.RunGenerators(edited);
        GeneratorRunResult result = driver.GetRunResult().Results.Single();

        Assert.Equal(IncrementalStepRunReason.Modified, Assert.Single(Outputs(result, ServiceGenerator.TrackingNames.Services)).Reason);
        Assert.Equal(IncrementalStepRunReason.Modified, Assert.Single(Outputs(result, ServiceGenerator.TrackingNames.ValidServices)).Reason);
        Assert.All(SourceOutputs(result), o => Assert.Equal(IncrementalStepRunReason.Modified, o.Reason));
        Assert.Contains("AddAsync(long a, int b", Source(driver, "Inc.ICalculator.Proxy.g.cs"), StringComparison.Ordinal);
        Assert.NotEqual(before, Source(driver, "Inc.ICalculator.Proxy.g.cs"));
    }

    [Fact]
    public void EditingOneServiceLeavesAnotherServiceCached()
    {
        const string Other = """
            using System.Threading.Tasks;
            using OffloadRpc;

            namespace Inc;

            [OffloadService]
            public interface IPrinter
            {
                Task PrintAsync(string text);
            }
            """;
        CSharpCompilation compilation = GeneratorHarness.CreateCompilation().AddSyntaxTrees(
            GeneratorHarness.Parse(Service, ServicePath),
            GeneratorHarness.Parse(Other, "Printer.cs"));
        GeneratorDriver driver = GeneratorHarness.CreateDriver().RunGenerators(compilation);

        CSharpCompilation edited = Replace(compilation, "Printer.cs", Other.Replace("string text", "string text, int copies", StringComparison.Ordinal));
        GeneratorRunResult result = driver.RunGenerators(edited).GetRunResult().Results.Single();

        var services = Outputs(result, ServiceGenerator.TrackingNames.Services).ToArray();
        Assert.Equal(2, services.Length);
        var modified = Assert.Single(services, o => o.Reason == IncrementalStepRunReason.Modified);
        Assert.Equal("IPrinter", Assert.IsType<ServiceModel>(modified.Value).InterfaceName);
        var kept = Assert.Single(services, o => o.Reason != IncrementalStepRunReason.Modified);
        Assert.Contains(kept.Reason, s_cachedOrUnchanged);
        Assert.Equal("ICalculator", Assert.IsType<ServiceModel>(kept.Value).InterfaceName);

        var sources = SourceOutputs(result).ToArray();
        Assert.Equal(2, sources.Length);
        Assert.Single(sources, o => o.Reason == IncrementalStepRunReason.Modified);
        Assert.Single(sources, o => s_cachedOrUnchanged.Contains(o.Reason));
    }

    /// <summary>No step of ours holds a symbol, syntax node, semantic model or compilation: they would root old compilations and defeat caching.</summary>
    [Fact]
    public void StepOutputsHoldOnlyModels()
    {
        (CSharpCompilation compilation, GeneratorDriver driver) = RunOnce();
        driver = driver.RunGenerators(Replace(compilation, UnrelatedPath, Unrelated.Replace("x * 2", "x << 1", StringComparison.Ordinal)));

        foreach (GeneratorRunResult result in new[] { RunOnce().Driver.GetRunResult().Results.Single(), driver.GetRunResult().Results.Single() })
        {
            foreach (string step in new[] { ServiceGenerator.TrackingNames.Services, ServiceGenerator.TrackingNames.ValidServices })
            {
                var outputs = Outputs(result, step).ToArray();
                Assert.NotEmpty(outputs);
                Assert.All(outputs, o =>
                {
                    Assert.True(o.Value is null or ServiceModel, $"Step {step} output is a {o.Value?.GetType()}");
                    AssertHoldsNoRoslynObjects(o.Value, step, new HashSet<object>(ReferenceEqualityComparer.Instance));
                });
            }
        }

        AssertTypeHoldsNoRoslynObjects(typeof(ServiceModel), new HashSet<Type>());
    }

    private static (CSharpCompilation Compilation, GeneratorDriver Driver) RunOnce()
    {
        CSharpCompilation compilation = GeneratorHarness.CreateCompilation().AddSyntaxTrees(
            GeneratorHarness.Parse(Service, ServicePath),
            GeneratorHarness.Parse(Unrelated, UnrelatedPath));
        GeneratorDriver driver = GeneratorHarness.CreateDriver().RunGenerators(compilation);
        Assert.Equal(3, driver.GetRunResult().Results.Single().GeneratedSources.Length);
        return (compilation, driver);
    }

    private static CSharpCompilation Replace(CSharpCompilation compilation, string path, string text)
    {
        SyntaxTree old = compilation.SyntaxTrees.Single(t => t.FilePath == path);
        return compilation.ReplaceSyntaxTree(old, GeneratorHarness.Parse(text, path));
    }

    private static string Source(GeneratorDriver driver, string hintName) =>
        driver.GetRunResult().Results.Single().GeneratedSources.Single(s => s.HintName == hintName).SourceText.ToString();

    private static IEnumerable<(object Value, IncrementalStepRunReason Reason)> Outputs(GeneratorRunResult result, string step)
    {
        Assert.True(result.TrackedSteps.ContainsKey(step), $"No step named {step}; steps: {string.Join(", ", result.TrackedSteps.Keys)}");
        return result.TrackedSteps[step].SelectMany(s => s.Outputs);
    }

    private static IEnumerable<(object Value, IncrementalStepRunReason Reason)> SourceOutputs(GeneratorRunResult result) =>
        result.TrackedOutputSteps[WellKnownGeneratorOutputs.SourceOutput].SelectMany(s => s.Outputs);

    private static void AssertModelsAndSourcesCached(GeneratorRunResult result)
    {
        foreach (string step in new[] { ServiceGenerator.TrackingNames.Services, ServiceGenerator.TrackingNames.ValidServices })
        {
            var outputs = Outputs(result, step).ToArray();
            Assert.NotEmpty(outputs);
            Assert.All(outputs, o => Assert.True(s_cachedOrUnchanged.Contains(o.Reason), $"Step {step} output is {o.Reason}, expected Cached or Unchanged"));
        }

        var sources = SourceOutputs(result).ToArray();
        Assert.NotEmpty(sources);
        Assert.All(sources, o => Assert.True(s_cachedOrUnchanged.Contains(o.Reason), $"Source output is {o.Reason}, expected Cached or Unchanged"));
        Assert.Equal(3, result.GeneratedSources.Length);
    }

    private static bool IsRoslynObject(Type type) =>
        typeof(ISymbol).IsAssignableFrom(type) || typeof(Compilation).IsAssignableFrom(type) || typeof(SyntaxNode).IsAssignableFrom(type)
        || typeof(SyntaxTree).IsAssignableFrom(type) || typeof(SemanticModel).IsAssignableFrom(type) || typeof(Location).IsAssignableFrom(type)
        || type == typeof(SyntaxToken) || type == typeof(AttributeData) || type == typeof(TypedConstant);

    /// <summary>Walks a value's object graph (fields, tuples, collections).</summary>
    private static void AssertHoldsNoRoslynObjects(object? value, string path, HashSet<object> seen)
    {
        if (value is null || value is string || value.GetType().IsPrimitive || value.GetType().IsEnum)
        {
            return;
        }

        Type type = value.GetType();
        Assert.False(IsRoslynObject(type), $"{path} holds a {type}");
        if (!type.IsValueType && !seen.Add(value))
        {
            return;
        }

        if (value is IEnumerable items)
        {
            int i = 0;
            foreach (object? item in items)
            {
                AssertHoldsNoRoslynObjects(item, $"{path}[{i++}]", seen);
            }
        }

        if (value is ITuple tuple)
        {
            for (int i = 0; i < tuple.Length; i++)
            {
                AssertHoldsNoRoslynObjects(tuple[i], $"{path}.Item{i + 1}", seen);
            }
        }

        foreach (FieldInfo field in type.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic))
        {
            if (field.FieldType.IsPointer || field.FieldType.IsByRefLike)
            {
                continue;
            }

            AssertHoldsNoRoslynObjects(field.GetValue(value), $"{path}.{field.Name}", seen);
        }
    }

    /// <summary>The model types, by their declared fields: whatever a future model field holds must be plain data.</summary>
    private static void AssertTypeHoldsNoRoslynObjects(Type type, HashSet<Type> seen)
    {
        if (!seen.Add(type) || type.IsPrimitive || type.IsEnum || type == typeof(string))
        {
            return;
        }

        Assert.False(IsRoslynObject(type), $"Model type {type} is a Roslyn object");
        Assert.False(type == typeof(object), "A model field of type object can hold anything");
        if (Nullable.GetUnderlyingType(type) is { } underlying)
        {
            AssertTypeHoldsNoRoslynObjects(underlying, seen);
            return;
        }

        if (type.IsGenericType && type.GetGenericTypeDefinition() == typeof(ImmutableArray<>))
        {
            AssertTypeHoldsNoRoslynObjects(type.GetGenericArguments()[0], seen);
            return;
        }

        foreach (FieldInfo field in type.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic))
        {
            AssertTypeHoldsNoRoslynObjects(field.FieldType, seen);
        }
    }
}
