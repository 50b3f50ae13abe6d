using System.Reflection;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Diagnostics;
using Xunit;

namespace OffloadRpc.Analyzers.Tests;

/// <summary>The one catalogue: every descriptor has an id constant, an absolute help link to a page that exists, and an analyzer that reports it.</summary>
public sealed class DiagnosticsCatalogueTests
{
    private static readonly DiagnosticDescriptor[] s_descriptors = typeof(Diagnostics)
        .GetFields(BindingFlags.Public | BindingFlags.Static)
        .Where(field => field.FieldType == typeof(DiagnosticDescriptor))
        .Select(field => (DiagnosticDescriptor)field.GetValue(null)!)
        .ToArray();

    private static readonly string[] s_ids = typeof(Diagnostics)
        .GetFields(BindingFlags.Public | BindingFlags.Static)
        .Where(field => field.IsLiteral && field.FieldType == typeof(string) && field.Name != nameof(Diagnostics.HelpLinkBase))
        .Select(field => (string)field.GetRawConstantValue()!)
        .ToArray();

    [Fact]
    public void Every_id_constant_has_one_descriptor()
    {
        Assert.Contains(Diagnostics.ReturnType, s_ids);
        Assert.Contains(Diagnostics.UsedAfterMove, s_ids);
        Assert.Equal(s_ids.Order(), s_descriptors.Select(d => d.Id).Order());
        Assert.All(s_ids, id => Assert.Matches("^OFFRPC[12][0-9]{3}$", id));
    }

    [Fact]
    public void Every_help_link_is_an_absolute_url_to_the_diagnostics_page()
    {
        Assert.True(Uri.TryCreate(Diagnostics.HelpLinkBase, UriKind.Absolute, out Uri? root) && root.Scheme == Uri.UriSchemeHttps, Diagnostics.HelpLinkBase);
        Assert.All(s_descriptors, descriptor =>
        {
            Assert.True(Uri.TryCreate(descriptor.HelpLinkUri, UriKind.Absolute, out Uri? link), $"{descriptor.Id}: '{descriptor.HelpLinkUri}' is not absolute");
            Assert.Equal(Uri.UriSchemeHttps, link!.Scheme);
            Assert.Equal(Diagnostics.HelpLinkBase + descriptor.Id + ".md", descriptor.HelpLinkUri);
        });
    }

    [Fact]
    public void Every_id_has_its_page_in_docs_diagnostics()
    {
        string docs = Path.Combine(RepositoryRoot(), "docs", "diagnostics");
        Assert.All(s_descriptors, descriptor =>
        {
            string page = Path.Combine(docs, descriptor.Id + ".md");
            Assert.True(File.Exists(page), $"{descriptor.Id}: no {page}");
            Assert.StartsWith("# " + descriptor.Id + ":", File.ReadAllText(page));
        });
    }

    [Fact]
    public void Every_descriptor_is_supported_by_exactly_one_analyzer()
    {
        DiagnosticAnalyzer[] analyzers = typeof(Diagnostics).Assembly.GetTypes()
            .Where(type => !type.IsAbstract && typeof(DiagnosticAnalyzer).IsAssignableFrom(type))
            .Select(type => (DiagnosticAnalyzer)Activator.CreateInstance(type)!)
            .ToArray();
        Assert.All(s_descriptors, descriptor =>
            Assert.Single(analyzers, analyzer => analyzer.SupportedDiagnostics.Contains(descriptor)));
    }

    /// <summary>The directory holding OffloadRpc.sln, found by walking up from the test assembly.</summary>
    private static string RepositoryRoot()
    {
        for (DirectoryInfo? directory = new(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "OffloadRpc.sln")))
            {
                return directory.FullName;
            }
        }

        throw new DirectoryNotFoundException("no OffloadRpc.sln above " + AppContext.BaseDirectory);
    }
}
