using System.Collections.Generic;
using System.Linq;
using System.Text;
using System.Threading;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using OffloadRpc.Analyzers;
using OffloadRpc.Generators.Models;

namespace OffloadRpc.Generators;

/// <summary>A reason a service contract cannot work, with the descriptor the analyzers report it under.</summary>
internal readonly record struct ContractProblem(DiagnosticDescriptor Descriptor, string Message, Location? Location);

/// <summary>
/// Turns an [OffloadService] interface into a <see cref="ServiceModel"/>, or reports why it cannot
/// cross the process boundary. Shared by the generator (which skips invalid contracts) and the
/// analyzers (which report them).
/// </summary>
internal sealed class ServiceParser
{
    public const string OffloadServiceAttribute = "OffloadRpc.OffloadServiceAttribute";

    private static readonly SymbolDisplayFormat s_typeFormat = SymbolDisplayFormat.FullyQualifiedFormat
        .AddMiscellaneousOptions(SymbolDisplayMiscellaneousOptions.IncludeNullableReferenceTypeModifier);

    private static readonly SymbolDisplayFormat s_wireFormat = SymbolDisplayFormat.FullyQualifiedFormat;

    private readonly INamedTypeSymbol? _task;
    private readonly INamedTypeSymbol? _taskOfT;
    private readonly INamedTypeSymbol? _valueTask;
    private readonly INamedTypeSymbol? _valueTaskOfT;
    private readonly INamedTypeSymbol? _cancellationToken;
    private readonly INamedTypeSymbol? _readOnlyMemory;
    private readonly INamedTypeSymbol? _memory;
    private readonly INamedTypeSymbol? _sharedBuffer;
    private readonly INamedTypeSymbol? _transferAttribute;
    private readonly INamedTypeSymbol? _stream;
    private readonly INamedTypeSymbol? _asyncEnumerable;

    public ServiceParser(Compilation compilation)
    {
        _task = compilation.GetTypeByMetadataName("System.Threading.Tasks.Task");
        _taskOfT = compilation.GetTypeByMetadataName("System.Threading.Tasks.Task`1");
        _valueTask = compilation.GetTypeByMetadataName("System.Threading.Tasks.ValueTask");
        _valueTaskOfT = compilation.GetTypeByMetadataName("System.Threading.Tasks.ValueTask`1");
        _cancellationToken = compilation.GetTypeByMetadataName("System.Threading.CancellationToken");
        _readOnlyMemory = compilation.GetTypeByMetadataName("System.ReadOnlyMemory`1");
        _memory = compilation.GetTypeByMetadataName("System.Memory`1");
        _sharedBuffer = compilation.GetTypeByMetadataName("OffloadRpc.SharedBuffer");
        _transferAttribute = compilation.GetTypeByMetadataName(TransferAttributeReader.AttributeMetadataName);
        _stream = compilation.GetTypeByMetadataName("System.IO.Stream");
        _asyncEnumerable = compilation.GetTypeByMetadataName("System.Collections.Generic.IAsyncEnumerable`1");
    }

    /// <summary>The model of <paramref name="service"/>, or null with the reasons in <paramref name="problems"/>.</summary>
    public ServiceModel? Parse(INamedTypeSymbol service, List<ContractProblem> problems, CancellationToken cancellationToken)
    {
        Location? where = service.Locations.FirstOrDefault();
        if (service.TypeKind != TypeKind.Interface)
        {
            return null; // the attribute is valid on interfaces only; the compiler reports misuse
        }

        if (service.IsGenericType)
        {
            problems.Add(new ContractProblem(Diagnostics.CannotImplementRule, $"[OffloadService] interface '{service.Name}' is generic; a service contract must be a closed, non-generic interface", where));
        }

        if (service.ContainingType is not null)
        {
            problems.Add(new ContractProblem(Diagnostics.CannotImplementRule, $"[OffloadService] interface '{service.Name}' is nested in a type; declare it at namespace level so its proxy and stub can be generated beside it", where));
        }

        if (service.AllInterfaces.Any(i => i.GetMembers().Length > 0))
        {
            problems.Add(new ContractProblem(Diagnostics.CannotImplementRule, $"[OffloadService] interface '{service.Name}' inherits members from another interface; declare every method on the service interface itself", where));
        }

        string serviceName = service.ToDisplayString(SymbolDisplayFormat.FullyQualifiedFormat).Replace("global::", string.Empty);
        var methods = new List<MethodModel>();
        var ids = new Dictionary<int, string>();
        foreach (ISymbol member in service.GetMembers())
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (member.IsStatic && (member.IsAbstract || member.IsVirtual))
            {
                problems.Add(new ContractProblem(Diagnostics.CannotImplementRule, $"[OffloadService] interface '{service.Name}' declares static abstract or virtual member '{member.Name}'; such an interface cannot be implemented by a proxy", member.Locations.FirstOrDefault()));
                continue;
            }

            if (member is IMethodSymbol { MethodKind: MethodKind.Ordinary } method)
            {
                if (method.IsStatic)
                {
                    continue; // static members with a body are not part of the contract
                }

                MethodModel? model = ParseMethod(method, serviceName, problems);
                if (model is null)
                {
                    continue;
                }

                if (ids.TryGetValue(model.MethodId, out string? other))
                {
                    problems.Add(new ContractProblem(Diagnostics.MethodIdCollisionRule, $"Methods '{other}' and '{method.Name}' of '{service.Name}' map to the same method id {model.MethodId}; rename one of them", method.Locations.FirstOrDefault()));
                    continue;
                }

                ids.Add(model.MethodId, method.Name);
                methods.Add(model);
            }
            else if (member is IPropertySymbol or IEventSymbol)
            {
                problems.Add(new ContractProblem(Diagnostics.CannotImplementRule, $"[OffloadService] interface '{service.Name}' declares {(member is IPropertySymbol ? "property" : "event")} '{member.Name}'; a service contract may only declare methods", member.Locations.FirstOrDefault()));
            }
        }

        if (problems.Count > 0)
        {
            return null;
        }

        methods.Sort((a, b) => a.MethodId.CompareTo(b.MethodId));
        var contract = new StringBuilder(serviceName).Append('{');
        foreach (MethodModel m in methods)
        {
            contract.Append(m.MethodId).Append(':').Append(m.Name).Append('(')
                .Append(string.Join(",", m.Parameters.Select(p => Wire(p.Value)))).Append(")->")
                .Append(m.Result is null ? "void" : m.Shape == ReturnShape.AsyncEnumerable ? "stream<" + Wire(m.Result) + ">" : Wire(m.Result)).Append(';');
        }

        string baseName = service.Name.Length > 1 && service.Name[0] == 'I' && char.IsUpper(service.Name[1]) ? service.Name.Substring(1) : service.Name;
        string metadataNamespace = service.ContainingNamespace.IsGlobalNamespace ? string.Empty : service.ContainingNamespace.ToDisplayString().Replace("@", string.Empty);
        return new ServiceModel(
            Namespace: service.ContainingNamespace.IsGlobalNamespace ? string.Empty : service.ContainingNamespace.ToDisplayString(),
            HintPrefix: (metadataNamespace.Length == 0 ? string.Empty : metadataNamespace + ".") + service.MetadataName,
            InterfaceName: service.Name,
            InterfaceType: service.ToDisplayString(s_typeFormat),
            ServiceName: serviceName,
            ProxyName: baseName + "Proxy",
            StubName: baseName + "Stub",
            RegistrationName: baseName + "Registration",
            Accessibility: service.DeclaredAccessibility == Accessibility.Public ? "public" : "internal",
            ContractHash: ContractHash.Contract(contract.Append('}').ToString()),
            Methods: methods.ToEquatableArray());
    }

    private static string Wire(ValueModel value) => value.Kind switch
    {
        ValueKind.ReadOnlyMemory or ValueKind.Memory or ValueKind.Array => "buffer<" + value.ElementType + ">",
        ValueKind.SharedBuffer => "lease",
        _ => value.WireType,
    };

    private MethodModel? ParseMethod(IMethodSymbol method, string serviceName, List<ContractProblem> problems)
    {
        Location? where = method.Locations.FirstOrDefault();
        int before = problems.Count;
        if (method.IsGenericMethod)
        {
            problems.Add(new ContractProblem(Diagnostics.GenericMethodRule, $"Service method '{method.Name}' is generic; service methods cannot have type parameters", where));
        }

        ReturnShape shape = default;
        ValueModel? result = null;
        var returnType = method.ReturnType as INamedTypeSymbol;
        INamedTypeSymbol? returnDefinition = returnType?.OriginalDefinition;
        if (Same(returnType, _task))
        {
            shape = ReturnShape.Task;
        }
        else if (Same(returnType, _valueTask))
        {
            shape = ReturnShape.ValueTask;
        }
        else if (IsAsyncEnumerable(returnType))
        {
            shape = ReturnShape.AsyncEnumerable;
            result = ClassifyItem(returnType!.TypeArguments[0], $"the items of '{method.Name}'", where, problems);
        }
        else if (Same(returnDefinition, _taskOfT) || Same(returnDefinition, _valueTaskOfT))
        {
            shape = Same(returnDefinition, _taskOfT) ? ReturnShape.TaskOfT : ReturnShape.ValueTaskOfT;
            if (IsAsyncEnumerable(returnType!.TypeArguments[0]))
            {
                problems.Add(new ContractProblem(Diagnostics.StreamShapeRule, $"Service method '{method.Name}' returns '{method.ReturnType.ToDisplayString()}'; a streamed result is returned as IAsyncEnumerable<T> itself, without a Task around it (the stream starts when it is enumerated)", where));
            }
            else
            {
                result = Classify(returnType.TypeArguments[0], $"the result of '{method.Name}'", where, problems);
                if (result is { Kind: ValueKind.Stream })
                {
                    problems.Add(new ContractProblem(Diagnostics.CannotCrossRule, $"The result of '{method.Name}' is a Stream; a Stream goes from client to server only: return a SharedBuffer, ReadOnlyMemory<byte> or IAsyncEnumerable<ReadOnlyMemory<byte>>", where));
                    result = null;
                }
            }
        }
        else
        {
            problems.Add(new ContractProblem(Diagnostics.ReturnTypeRule, $"Service method '{method.Name}' returns '{method.ReturnType.ToDisplayString()}'; it must return Task, ValueTask, Task<T>, ValueTask<T> or IAsyncEnumerable<T>", where));
        }

        var parameters = new List<ParameterModel>();
        string? cancellationTokenName = null;
        int streams = 0;
        for (int i = 0; i < method.Parameters.Length; i++)
        {
            IParameterSymbol parameter = method.Parameters[i];
            Location? at = parameter.Locations.FirstOrDefault() ?? where;
            if (Same(parameter.Type, _cancellationToken))
            {
                if (i != method.Parameters.Length - 1)
                {
                    problems.Add(new ContractProblem(Diagnostics.CancellationTokenNotLastRule, $"In '{method.Name}', the CancellationToken '{parameter.Name}' must be the last parameter", at));
                }

                cancellationTokenName = Escape(parameter.Name);
                continue;
            }

            if (parameter.RefKind != RefKind.None)
            {
                problems.Add(new ContractProblem(Diagnostics.CannotCrossRule, $"Parameter '{parameter.Name}' of '{method.Name}' is passed by {parameter.RefKind.ToString().ToLowerInvariant()}; values cross the process boundary by value only", at));
                continue;
            }

            ValueModel? value = Classify(parameter.Type, $"parameter '{parameter.Name}' of '{method.Name}'", at, problems);
            if (value is { Kind: ValueKind.Chunks or ValueKind.Items } && ++streams > 1)
            {
                problems.Add(new ContractProblem(Diagnostics.StreamShapeRule, $"Parameter '{parameter.Name}' of '{method.Name}' is a second IAsyncEnumerable<T>; a method takes at most one streamed argument", at));
                continue;
            }

            if (value is not null)
            {
                string? transfer = IsCopiedBuffer(value) ? Transfer(parameter) ?? Transfer(method) : null;
                parameters.Add(new ParameterModel(Escape(parameter.Name), parameter.Type.ToDisplayString(s_typeFormat), value, transfer));
            }
        }

        if (problems.Count > before)
        {
            return null;
        }

        string signature = serviceName + "." + method.Name + "(" + string.Join(",", parameters.Select(p => Wire(p.Value))) + ")";
        return new MethodModel(
            Name: Escape(method.Name),
            MethodId: ContractHash.MethodId(signature),
            Shape: shape,
            ReturnType: method.ReturnType.ToDisplayString(s_typeFormat),
            Result: result,
            Parameters: parameters.ToEquatableArray(),
            CancellationTokenName: cancellationTokenName,
            ResultTransfer: result is not null && IsCopiedBuffer(result) ? Transfer(method) : null);
    }

    private static bool IsCopiedBuffer(ValueModel value) => value.Kind is ValueKind.ReadOnlyMemory or ValueKind.Memory or ValueKind.Array or ValueKind.Stream or ValueKind.Chunks;

    /// <summary>The [Transfer(mode, cache)] on <paramref name="symbol"/> as emitted arguments, or null when absent, all Auto or not a defined value.</summary>
    private string? Transfer(ISymbol symbol) =>
        TransferAttributeReader.Read(symbol, _transferAttribute) is { IsAuto: false } choice
        && System.Enum.IsDefined(typeof(TransferMode), choice.Mode) && System.Enum.IsDefined(typeof(CachePolicy), choice.Cache)
            ? $"global::OffloadRpc.{nameof(TransferMode)}.{choice.Mode}, global::OffloadRpc.{nameof(CachePolicy)}.{choice.Cache}"
            : null;

    /// <summary>How a parameter or result of type <paramref name="type"/> crosses, or null (with a problem) when it cannot.</summary>
    private ValueModel? Classify(ITypeSymbol type, string what, Location? where, List<ContractProblem> problems)
    {
        string display = type.ToDisplayString(s_typeFormat);
        string wire = type.ToDisplayString(s_wireFormat);
        // Oblivious (nullable-disabled) references may be null; only an explicit non-nullable one may not.
        bool nullable = type.IsReferenceType && type.NullableAnnotation != NullableAnnotation.NotAnnotated;
        if (Same(type, _sharedBuffer))
        {
            return new ValueModel(ValueKind.SharedBuffer, display, wire, null, null, null, nullable, type.IsReferenceType);
        }

        if (Same(type, _stream))
        {
            return new ValueModel(ValueKind.Stream, display, "stream", null, null, null, nullable, true);
        }

        if (type is INamedTypeSymbol { IsGenericType: true } sequence && Same(sequence.OriginalDefinition, _asyncEnumerable)
            && sequence.TypeArguments[0] is INamedTypeSymbol chunk && chunk.IsGenericType && Same(chunk.OriginalDefinition, _readOnlyMemory) && chunk.TypeArguments[0].SpecialType == SpecialType.System_Byte)
        {
            return new ValueModel(ValueKind.Chunks, display, "chunks", null, null, null, nullable, true);
        }

        if (IsAsyncEnumerable(type))
        {
            ValueModel? item = ClassifyItem(((INamedTypeSymbol)type).TypeArguments[0], $"the items of {what}", where, problems);
            return item is null ? null : new ValueModel(ValueKind.Items, display, "stream<" + Wire(item) + ">", null, item.Type, null, nullable, true) { Item = item };
        }

        if (type is INamedTypeSymbol named && named.IsGenericType && (Same(named.OriginalDefinition, _readOnlyMemory) || Same(named.OriginalDefinition, _memory)))
        {
            ITypeSymbol element = named.TypeArguments[0];
            if (!element.IsUnmanagedType)
            {
                problems.Add(new ContractProblem(Diagnostics.CannotCrossRule, $"The type of {what}, '{type.ToDisplayString()}', cannot cross the process boundary: buffers must hold an unmanaged element type", where));
                return null;
            }

            ValueKind kind = Same(named.OriginalDefinition, _memory) ? ValueKind.Memory : ValueKind.ReadOnlyMemory;
            return new ValueModel(kind, display, wire, null, element.ToDisplayString(s_wireFormat), null, false, false);
        }

        if (type is IArrayTypeSymbol { Rank: 1 } array && array.ElementType.IsUnmanagedType && array.ElementType.TypeKind != TypeKind.Pointer)
        {
            return new ValueModel(ValueKind.Array, display, wire, null, array.ElementType.ToDisplayString(s_wireFormat), null, nullable, type.IsReferenceType);
        }

        string? why = type switch
        {
            { IsRefLikeType: true } => "it is a ref struct (Span-like) and cannot leave the stack",
            IPointerTypeSymbol or IFunctionPointerTypeSymbol => "pointers cannot cross a process boundary",
            ITypeParameterSymbol => "an open type parameter has no wire format",
            INamedTypeSymbol { TypeKind: TypeKind.Delegate } => "delegates cannot cross a process boundary",
            IArrayTypeSymbol { Rank: > 1 } => "multi-dimensional arrays have no MessagePack format",
            IDynamicTypeSymbol => "'dynamic' has no wire format; use a concrete type",
            _ => null,
        };
        if (why is not null)
        {
            problems.Add(new ContractProblem(Diagnostics.CannotCrossRule, $"The type of {what}, '{type.ToDisplayString()}', cannot cross the process boundary: {why}", where));
            return null;
        }

        if (type.TypeKind == TypeKind.Enum && type is INamedTypeSymbol { EnumUnderlyingType: { } underlying })
        {
            return new ValueModel(ValueKind.Enum, display, wire, PrimitiveSuffix(underlying.SpecialType), null, underlying.ToDisplayString(s_wireFormat), false, false);
        }

        if (PrimitiveSuffix(type.SpecialType) is { } suffix)
        {
            return new ValueModel(ValueKind.Primitive, display, wire, suffix, null, null, nullable, type.IsReferenceType);
        }

        if (NotSerializable(type) is { } plain)
        {
            problems.Add(new ContractProblem(Diagnostics.CannotCrossRule, $"The type of {what}, '{type.ToDisplayString()}', cannot cross the process boundary: MessagePack cannot serialize '{plain.ToDisplayString()}'; mark it [MessagePackObject] (with [Key] on its members) or use a supported type", where));
            return null;
        }

        return new ValueModel(ValueKind.MessagePack, display, wire, null, null, null, nullable, type.IsReferenceType);
    }

    /// <summary>
    /// A type declared in this compilation or a library (not the BCL) that MessagePack's standard
    /// resolver cannot handle: a class or struct with none of [MessagePackObject], [DataContract],
    /// [MessagePackFormatter] or [Union]. Looks through arrays, nullables and generic arguments.
    /// Lenient on purpose: anything from System.* passes, so a false alarm never blocks a build.
    /// </summary>
    private static ITypeSymbol? NotSerializable(ITypeSymbol type)
    {
        switch (type)
        {
            case IArrayTypeSymbol array:
                return NotSerializable(array.ElementType);
            case INamedTypeSymbol named:
                foreach (ITypeSymbol argument in named.TypeArguments)
                {
                    if (NotSerializable(argument) is { } inner)
                    {
                        return inner;
                    }
                }

                if (named.SpecialType != SpecialType.None || named.TypeKind is TypeKind.Enum or TypeKind.Interface or TypeKind.Error || named.IsTupleType)
                {
                    return null;
                }

                string space = named.ContainingNamespace?.ToDisplayString() ?? string.Empty;
                if (space == "System" || space.StartsWith("System.", System.StringComparison.Ordinal) || space.StartsWith("MessagePack", System.StringComparison.Ordinal))
                {
                    return null;
                }

                foreach (AttributeData attribute in named.GetAttributes())
                {
                    if (attribute.AttributeClass?.Name is "MessagePackObjectAttribute" or "DataContractAttribute" or "MessagePackFormatterAttribute" or "UnionAttribute")
                    {
                        return null;
                    }
                }

                return named.TypeKind is TypeKind.Class or TypeKind.Struct ? named : null;
            default:
                return null;
        }
    }

    private static string? PrimitiveSuffix(SpecialType type) => type switch
    {
        SpecialType.System_Boolean => "Boolean",
        SpecialType.System_Byte => "Byte",
        SpecialType.System_SByte => "SByte",
        SpecialType.System_Int16 => "Int16",
        SpecialType.System_UInt16 => "UInt16",
        SpecialType.System_Int32 => "Int32",
        SpecialType.System_UInt32 => "UInt32",
        SpecialType.System_Int64 => "Int64",
        SpecialType.System_UInt64 => "UInt64",
        SpecialType.System_Single => "Single",
        SpecialType.System_Double => "Double",
        SpecialType.System_Char => "Char",
        SpecialType.System_String => "String",
        _ => null,
    };

    private bool IsAsyncEnumerable(ITypeSymbol? type) => type is INamedTypeSymbol { IsGenericType: true } named && Same(named.OriginalDefinition, _asyncEnumerable);

    /// <summary>How one item of a stream crosses: anything a unary call carries, except another stream.</summary>
    private ValueModel? ClassifyItem(ITypeSymbol type, string what, Location? where, List<ContractProblem> problems)
    {
        if (IsAsyncEnumerable(type) || Same(type, _stream))
        {
            problems.Add(new ContractProblem(Diagnostics.StreamShapeRule, $"The type of {what}, '{type.ToDisplayString()}', is itself a stream; a stream's items are values, buffers or SharedBuffer leases, not streams", where));
            return null;
        }

        return Classify(type, what, where, problems);
    }

    private static bool Same(ITypeSymbol? a, ITypeSymbol? b) => a is not null && b is not null && SymbolEqualityComparer.Default.Equals(a, b);

    private static string Escape(string identifier) =>
        SyntaxFacts.GetKeywordKind(identifier) != SyntaxKind.None || SyntaxFacts.GetContextualKeywordKind(identifier) is SyntaxKind.AwaitKeyword
            ? "@" + identifier
            : identifier;
}
