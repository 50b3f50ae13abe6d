using Microsoft.CodeAnalysis;

namespace OffloadRpc.Analyzers;

/// <summary>Every OffloadRpc diagnostic: ids (OFFRPC1xxx contract shape, OFFRPC2xxx transfer advice), titles, help links.</summary>
public static class Diagnostics
{
    public const string ReturnType = "OFFRPC1001";
    public const string CannotCross = "OFFRPC1002";
    public const string CancellationTokenNotLast = "OFFRPC1003";
    public const string GenericMethod = "OFFRPC1004";
    public const string MethodIdCollision = "OFFRPC1005";
    public const string CannotImplement = "OFFRPC1006";

    private const string ContractCategory = "OffloadRpc.Contract";

    public static readonly DiagnosticDescriptor ReturnTypeRule = Contract(ReturnType, "Service method must return Task, ValueTask, Task<T> or ValueTask<T>");

    public static readonly DiagnosticDescriptor CannotCrossRule = Contract(CannotCross, "Type cannot cross the process boundary");

    public static readonly DiagnosticDescriptor CancellationTokenNotLastRule = Contract(CancellationTokenNotLast, "CancellationToken must be the last parameter");

    public static readonly DiagnosticDescriptor GenericMethodRule = Contract(GenericMethod, "Generic methods are not supported in a service");

    public static readonly DiagnosticDescriptor MethodIdCollisionRule = Contract(MethodIdCollision, "Two methods map to the same method id");

    public static readonly DiagnosticDescriptor CannotImplementRule = Contract(CannotImplement, "Service interface cannot be implemented by a proxy");

    /// <summary>The descriptor of a contract problem the shared parser reported.</summary>
    public static DiagnosticDescriptor? ForId(string id) => id switch
    {
        ReturnType => ReturnTypeRule,
        CannotCross => CannotCrossRule,
        CancellationTokenNotLast => CancellationTokenNotLastRule,
        GenericMethod => GenericMethodRule,
        MethodIdCollision => MethodIdCollisionRule,
        CannotImplement => CannotImplementRule,
        _ => null,
    };

    private static DiagnosticDescriptor Contract(string id, string title) => new(
        id,
        title,
        messageFormat: "{0}",
        category: ContractCategory,
        defaultSeverity: DiagnosticSeverity.Error,
        isEnabledByDefault: true,
        description: title + ". The generator emits nothing for such an interface, so this is the error to fix.",
        helpLinkUri: $"docs/diagnostics/{id}.md");
}
